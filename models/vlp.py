"""The vision-language pretraining model: encoders + fusion + the configured objectives.

Every shared encoder pass is computed once per step and handed to all objectives through a `StepContext`: the
unmasked image and text encodings (and their fusion-input projections) are computed lazily on first use and cached,
so ITC, ITM and MLM never re-encode what another objective already encoded. The two masked fusion passes of GLSCL
(A: 80%-dropped image + full text, B: full image + 40%-masked text) are likewise computed once and shared by MGSC and
MLTC (`glscl_passes`), reusing the cached unmasked encodings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn

from models.fusion import FusionConfig, FusionEncoder, FusionOutput
from models.masking import mask_text_for_completion, random_keep_indices
from models.objectives import ITC, ITM, MGSC, MLM, MLTC, OBJECTIVE_CONFIGS, OBJECTIVE_ORDER, MgscConfig
from models.objectives.base import LocalGather
from models.text import TextConfig, TextEncoder
from models.vision import VisionConfig, VisionEncoder, VisionOutput


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


class StepContext:
    """One step's inputs and the encoder passes shared between objectives."""

    def __init__(self, model: "VLPModel", batch: dict):
        self.model = model
        self.pixel_values = batch["pixel_values"]
        self.input_ids = batch["input_ids"]
        self.attention_mask = batch["attention_mask"]
        # MLM inputs masked by the data collator (data.mlm_probability), if it did; else MLM masks on the device.
        self.mlm_input_ids, self.mlm_labels = batch.get("mlm_input_ids"), batch.get("mlm_labels")
        self.gather = model.gather
        self.cache: dict = {}

    @cached_property
    def image(self) -> VisionOutput:
        return self.model.vision(self.pixel_values)

    @property
    def num_frames(self) -> int:
        return self.image.num_frames

    @cached_property
    def image_proj(self) -> torch.Tensor:
        return self.model.fusion.project_image(self.image.tokens)

    @cached_property
    def text_proj(self) -> torch.Tensor:
        return self.encode_text(self.input_ids, self.attention_mask)

    @property
    def image_global(self) -> torch.Tensor:
        return self.image_proj[:, : self.num_frames].mean(1)

    @property
    def text_global(self) -> torch.Tensor:
        return self.text_proj[:, 0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.fusion.project_text(self.model.text(input_ids, attention_mask))

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, **kw) -> FusionOutput:
        return self.model.fusion(text, text_mask, image, self.num_frames, **kw)

    def glscl_passes(self, image_mask_ratio: float, text_mask_ratio: float, mask_token_id: int,
                     special_ids: torch.Tensor, text_with_replacement: bool = False
                     ) -> tuple[FusionOutput, FusionOutput]:
        """-> (pass A, pass B), computed once per step and shared by MGSC and MLTC.

        A = fusion(image with image_mask_ratio of its patches dropped MAE-style, full text);
        B = fusion(full image, text with text_mask_ratio of its tokens replaced by the mask token).
        The drawn masks are left in the cache: "glscl_keep" (B, K) kept patch indices, "glscl_text_mask" (B, L) bool,
        "glscl_masked_ids" (B, L).
        """
        key = (float(image_mask_ratio), float(text_mask_ratio), bool(text_with_replacement))
        if "glscl_pass_a" in self.cache:
            if self.cache["glscl_ratios"] != key:
                raise ValueError(f"MGSC/MLTC disagree on the shared mask ratios: {self.cache['glscl_ratios']} vs {key}")
            return self.cache["glscl_pass_a"], self.cache["glscl_pass_b"]
        vision = self.model.vision
        keep = random_keep_indices(self.pixel_values.shape[0], vision.num_patches, 1.0 - image_mask_ratio,
                                   self.pixel_values.device)
        image_a = self.model.fusion.project_image(vision(self.pixel_values, keep=keep).tokens)
        # Read from A: frame CLS (MGSC) and text tokens (MLTC targets, MGSC text target = its CLS);
        # from B: text and frame CLS (MGSC), plus all tokens when MLTC runs. The last fusion layer computes only those.
        tokens = "all" if "mltc" in self.model.objectives else "cls"
        pass_a = self.fuse(self.text_proj, self.attention_mask, image_a, text_out=tokens, image_out="cls")
        masked_ids, text_mask = mask_text_for_completion(self.input_ids, self.attention_mask, special_ids,
                                                         mask_token_id, text_mask_ratio,
                                                         with_replacement=text_with_replacement)
        pass_b = self.fuse(self.encode_text(masked_ids, self.attention_mask), self.attention_mask, self.image_proj,
                           text_out=tokens, image_out=tokens)
        self.cache.update(glscl_ratios=key, glscl_keep=keep, glscl_text_mask=text_mask, glscl_masked_ids=masked_ids,
                          glscl_pass_a=pass_a, glscl_pass_b=pass_b)
        return pass_a, pass_b


class VLPModel(nn.Module):
    def __init__(self, cfg: ModelConfig, objective_cfgs: dict, tokenizer):
        super().__init__()
        unknown = set(objective_cfgs) - set(OBJECTIVE_CONFIGS)
        if unknown:
            raise ValueError(f"objectives: unknown {sorted(unknown)}; known: {sorted(OBJECTIVE_CONFIGS)}")
        if not objective_cfgs:
            raise ValueError("objectives: enable at least one objective")
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        if cfg.vision.pretrained:
            load_vision_tower(self.vision, cfg.vision.pretrained)
        self.text = TextEncoder(cfg.text)
        if len(tokenizer) > self.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text model only {self.text.vocab_size}")
        self.fusion = FusionEncoder(cfg.fusion, self.text.hidden_size, self.vision.embed_dim)
        d = cfg.fusion.hidden_size
        builders = {
            "itc": lambda c: ITC(c, d),
            "itm": lambda c: ITM(c, d),
            "mlm": lambda c: MLM(c, d, self.text.vocab_size, tokenizer.mask_token_id, tokenizer.all_special_ids),
            "mgsc": lambda c: MGSC(c, tokenizer.mask_token_id, tokenizer.all_special_ids),
            # MLTC reuses MGSC's passes A and B, so it masks with MGSC's ratios (the defaults when MGSC is off).
            "mltc": lambda c: MLTC(c, self.vision.embed_dim, tokenizer.mask_token_id, tokenizer.all_special_ids,
                                   objective_cfgs.get("mgsc") or MgscConfig()),
        }
        self.objectives = nn.ModuleDict({n: builders[n](objective_cfgs[n]) for n in OBJECTIVE_ORDER
                                         if n in objective_cfgs})
        self.weights = {n: float(objective_cfgs[n].weight) for n in self.objectives}
        self.gather = LocalGather()

    def set_gather(self, gather) -> None:
        self.gather = gather

    def forward(self, batch: dict) -> dict:
        ctx = StepContext(self, batch)
        losses, stats = {}, {}
        total = 0.0
        for name, objective in self.objectives.items():
            out = objective(ctx)
            total = total + self.weights[name] * sum(out.losses.values())
            losses.update(out.losses)
            stats.update(out.stats)
        return {"loss": total, "losses": losses, "stats": stats}

    # Retrieval-style embeddings (zero-shot evaluation); need the ITC objective's projections.
    def _itc(self) -> ITC:
        if "itc" not in self.objectives:
            raise ValueError("encode_image/encode_text need the itc objective")
        return self.objectives["itc"]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values)
        proj = self.fusion.project_image(out.tokens[:, : out.num_frames])
        return self._itc().embed_image(proj.mean(1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        proj = self.fusion.project_text(self.text(input_ids, attention_mask))
        return self._itc().embed_text(proj[:, 0])

    def layer_stacks(self) -> dict[str, list[nn.Module]]:
        return {"vision": list(self.vision.blocks), "text": list(self.text.layers),
                "fusion": list(self.fusion.layers)}

    def no_weight_decay(self) -> set[str]:
        names = {f"vision.{n}" for n in self.vision.no_weight_decay()}
        for name, objective in self.objectives.items():
            if hasattr(objective, "no_weight_decay"):
                names |= {f"objectives.{name}.{n}" for n in objective.no_weight_decay()}
        return names


def load_vision_tower(vision: VisionEncoder, path: str) -> None:
    """Load a tower file from `convert_checkpoint.py import` (kind "vision") strictly into `vision`.

    Loaded as `VisionEncoder.load_timm_state_dict` does (pos-embed resample, the configured last blocks dropped by
    name). An imported image model never trained its temporal embedding, so the tower keeps its own random init for
    it (SCL initialises it as scale x randn, not zeros)."""
    from models.weights import WeightsError, load_weights

    sd, meta = load_weights(path)
    if meta.get("kind") != "vision":
        raise WeightsError(f"model.vision.pretrained: {path} is not a vision-tower file (kind={meta.get('kind')!r}); "
                           "write one with `python train/convert_checkpoint.py import ...`")
    if "format_in" in meta:  # imported from an image model: nothing learnt in its (zero) temporal table
        sd.pop("temporal_embed", None)
    try:
        vision.load_timm_state_dict(sd)
    except ValueError as e:
        raise WeightsError(f"model.vision.pretrained {path}: {e}") from None


def build_model(cfg: ModelConfig, objective_cfgs: dict, tokenizer) -> VLPModel:
    return VLPModel(cfg, objective_cfgs, tokenizer)
