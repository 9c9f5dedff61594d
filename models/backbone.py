"""The backbone shared by pretraining and fine-tuning: towers, fusion, ITC projections + temperature, ITM head.

Two families (`model.family`): "coattention" (METER/SCL: a text tower, then 2 x N co-attention fusion layers over
projected tokens) and "single_stream" (SIMLA: one BERT, models/single_stream.py, that is the text encoder without its
cross-attention and the fusion encoder with it; image tokens enter unprojected, so the ViT width must equal BERT's).
Both answer the same calls, so objectives and task heads name no family:

    encode_image(pixels) -> ImageTokens   projected image tokens (the fusion's image input) + the frame count
    encode_text(ids, mask) -> (B, L, D)   the text encoder's tokens (ITC reads their CLS)
    fusion_text(ids, mask) -> (B, L, D)   the fusion's text input: encode_text's output (coattention, where
                                          `fuses_text_encoding` is True) or the caption embeddings (single stream)
    fuse(text, text_mask, image, ...)     the cross-modal encoder on fusion_text and encode_image outputs
    embed_image / embed_text              L2-normalised retrieval embeddings (need the "itc" head)

Pretraining objectives (models/objectives/) and fine-tuning heads (models/tasks/) sit beside it; neither is part of
it. Heads are optional parts: `model.heads` names them, or (None) the enabled objectives' needs decide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.fusion import FusionConfig, FusionEncoder, FusionOutput
from models.heads import ProjectionHead
from models.init import init_bert_style
from models.text import TextConfig, TextEncoder
from models.vision import VisionConfig, VisionEncoder

HEADS = ("itc", "itm")   # build order (fixed: it decides the random init)


@dataclass
class ContrastiveHeadConfig:
    """ITC projections and the learnable temperature. parameterization "log": stored as log(1/tau) and clamped to
    [min, max] (ours); "raw": tau itself, used directly as the divisor with no clamp (the released SCL code's
    `cl_temp`, which can run to zero or negative; min/max are then unused)."""
    embed_dim: int = 256
    init_temperature: float = 0.07
    min_temperature: float = 0.01
    max_temperature: float = 0.5
    parameterization: Literal["log", "raw"] = "log"
    # "mlp": Linear-LN-GELU-Linear (SCL/METER); "linear": one Linear (ALBEF/SIMLA's vision_proj / text_proj)
    projection: Literal["mlp", "linear"] = "mlp"

    def validate(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"model.itc.embed_dim must be >= 1, got {self.embed_dim}")
        if self.parameterization not in ("log", "raw"):
            raise ValueError(f"model.itc.parameterization: expected 'log' or 'raw', got {self.parameterization!r}")
        if self.projection not in ("mlp", "linear"):
            raise ValueError(f"model.itc.projection: expected 'mlp' or 'linear', got {self.projection!r}")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ValueError("model.itc: need 0 < min_temperature <= init_temperature <= max_temperature")


FAMILIES = ("coattention", "single_stream")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    itc: ContrastiveHeadConfig = field(default_factory=ContrastiveHeadConfig)
    heads: Optional[list[Literal["itc", "itm"]]] = None   # None: the heads the enabled objectives use
    # "coattention" (SCL/GLSCL, METER) or "single_stream" (SIMLA; model.fusion is then unused)
    family: Literal["coattention", "single_stream"] = "coattention"

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family: expected one of {FAMILIES}, got {self.family!r}")
        if self.family == "single_stream" and self.text.arch != "bert":
            raise ValueError("model.text.arch: the single_stream family is one BERT (got "
                             f"{self.text.arch!r})")
        if self.heads is not None and len(set(self.heads)) != len(self.heads):
            raise ValueError(f"model.heads: duplicate entries in {self.heads}")


class ImageTokens(NamedTuple):   # a NamedTuple so ZeRO-3's hooks see the tensor
    tokens: torch.Tensor   # (B, F + F*P', D) projected: F frame CLS tokens, then the patch tokens
    num_frames: int

    @property
    def global_(self) -> torch.Tensor:
        """(B, D) mean of the frame CLS tokens: the image's global feature (ITC, retrieval)."""
        return self.tokens[:, : self.num_frames].mean(1)


class ContrastiveHead(nn.Module):
    def __init__(self, cfg: ContrastiveHeadConfig, dim: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        proj = ProjectionHead if cfg.projection == "mlp" else nn.Linear
        self.image_proj = proj(dim, cfg.embed_dim)
        self.text_proj = proj(dim, cfg.embed_dim)
        # Shape (1,), not 0-dim: DeepSpeed 0.19 cannot broadcast 0-dim parameters at init.
        if cfg.parameterization == "raw":
            self.temperature = nn.Parameter(torch.full((1,), float(cfg.init_temperature)))
        else:
            self.log_inv_temperature = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))

    def forward(self, image_global: Optional[torch.Tensor] = None, text_global: Optional[torch.Tensor] = None):
        """-> (normalised image embedding or None, normalised text embedding or None, temperature). Called as a
        module (not through helper methods) so that ZeRO-3 gathers the temperature parameter."""
        c = self.cfg
        zi = None if image_global is None else F.normalize(self.image_proj(image_global).float(), dim=-1)
        zt = None if text_global is None else F.normalize(self.text_proj(text_global).float(), dim=-1)
        if c.parameterization == "raw":
            tau = self.temperature.float().squeeze(0)
        else:
            tau = 1.0 / self.log_inv_temperature.float().clamp(math.log(1 / c.max_temperature),
                                                               math.log(1 / c.min_temperature)).exp().squeeze(0)
        return zi, zt, tau

    def temperature_name(self) -> str:
        return "temperature" if self.cfg.parameterization == "raw" else "log_inv_temperature"


# The submodules on the retrieval path of each family (the momentum encoders copy these).
RETRIEVAL_MODULES = {"coattention": ("vision", "text", "fusion.image_in", "fusion.text_in", "itc"),
                     "single_stream": ("vision", "text", "itc")}


def image_embedding(get, pixel_values: torch.Tensor, tokens: Optional[ImageTokens] = None):
    """The retrieval image embedding through `get(name)`'s modules (the online ones, or their momentum copies; None
    for a module the family lacks). tokens: the vision tower's output for these pixels, if already computed."""
    out = get("vision")(pixel_values) if tokens is None else tokens
    cls = out.tokens[:, : out.num_frames]
    image_in = get("fusion.image_in")
    return get("itc")(image_global=(cls if image_in is None else image_in(cls)).mean(1))[0]


def text_embedding(get, input_ids, attention_mask, hidden: Optional[torch.Tensor] = None):
    """hidden: the text tower's output (text mode) for these ids, if already computed."""
    if hidden is None:
        text = get("text")
        encode = getattr(text, "encode", text)   # the single-stream BERT's text mode, or the text tower
        hidden = encode(input_ids, attention_mask)
    cls = hidden[:, 0]
    text_in = get("fusion.text_in")
    return get("itc")(text_global=cls if text_in is None else text_in(cls))[1]


class LocalGather:
    """Single-process stand-in for the all-gather the trainer injects (models never touch torch.distributed)."""

    rank = 0
    world_size = 1
    loss_grad_scale = 1.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gathered_grad(t: torch.Tensor, gather) -> torch.Tensor:
    """`t` unchanged, its gradient scaled by the gather's `loss_grad_scale`: apply it to the features a loss reads
    through the gather (or to a loss whose only parameters are those features). 1 (train.gathered_grad: exact) keeps
    the full-batch gradient. The released SCL code's AllGather_multi backward keeps only the local slice without
    summing over ranks, so after DDP's averaging the feature path of its gathered losses gets 1/world_size of that,
    while a learnable temperature, outside the gather, gets its full gradient (train.gathered_grad: official)."""
    scale = getattr(gather, "loss_grad_scale", 1.0)
    return t if scale == 1.0 else _ScaleGrad.apply(t, scale)


class VLPBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, heads: Sequence[str] = HEADS):
        super().__init__()
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"model.heads: unknown {sorted(unknown)}; known: {list(HEADS)}")
        self.cfg = cfg
        self.family = cfg.family
        self.vision = VisionEncoder(cfg.vision)
        if cfg.vision.pretrained:
            load_vision_tower(self.vision, cfg.vision.pretrained)
        if cfg.family == "single_stream":
            from models.single_stream import SingleStreamBert

            self.text = SingleStreamBert(cfg.text, self.vision.embed_dim)
            d = self.text.hidden_size
            if d != self.vision.embed_dim:
                raise ValueError(f"model: the single_stream family feeds image tokens to the BERT (MIM's query "
                                 f"stream), so the vision width {self.vision.embed_dim} must equal the text hidden "
                                 f"size {d}")
            self.pooled_dim = d   # the multimodal text CLS
        else:
            self.text = TextEncoder(cfg.text)
            self.fusion = FusionEncoder(cfg.fusion, self.text.hidden_size, self.vision.embed_dim)
            d = cfg.fusion.hidden_size
            self.pooled_dim = 2 * d   # [pooled text CLS; pooled image CLS]
        self.hidden_size = d   # width of the fusion's tokens
        self.fuses_text_encoding = cfg.family == "coattention"
        self.retrieval_modules = RETRIEVAL_MODULES[cfg.family]
        self.heads = [h for h in HEADS if h in heads]
        if "itc" in self.heads:
            self.itc = ContrastiveHead(cfg.itc, d)
        if "itm" in self.heads:
            self.itm_head = nn.Linear(self.pooled_dim, 2)   # on the fusion's pooled features
            init_bert_style(self.itm_head)       # as SCL's itm_score (the ITC projections keep PyTorch's init there too)
        self.gather = LocalGather()

    def set_gather(self, gather) -> None:
        """The trainer's cross-rank all-gather with gradient (train/distributed.py TorchGather)."""
        self.gather = gather

    def encode_image(self, pixel_values: torch.Tensor, **vision_kw) -> ImageTokens:
        """vision_kw: `keep` (MAE-style patch dropping) or `token_mask` + `mask_token` (see VisionEncoder)."""
        out = self.vision(pixel_values, **vision_kw)
        if self.family == "single_stream":
            return ImageTokens(out.tokens, out.num_frames)
        return ImageTokens(self.fusion.project_image(out.tokens), out.num_frames)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "single_stream":
            return self.text.encode(input_ids, attention_mask)
        return self.fusion.project_text(self.text(input_ids, attention_mask))

    def fusion_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The fusion's text input for these ids (see the module docstring)."""
        if self.family == "single_stream":
            return self.text.embed(input_ids)
        return self.encode_text(input_ids, attention_mask)

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, image: ImageTokens, image_token_type: int = 1,
             return_attention: bool = False, text_out: str = "all", image_out: str = "all",
             image_mask: Optional[torch.Tensor] = None) -> FusionOutput:
        """image_token_type: the image's modality-type row (1; NLVR2's second image 2, model.fusion.num_token_types).
        Single stream: the output has text tokens only (image None), cls_feats = the multimodal text CLS, and the
        text->image maps are the cross-attention of every layer."""
        if self.family == "single_stream":
            if image_token_type != 1:
                raise ValueError("the single_stream family has no modality-type embeddings (image_token_type must "
                                 "be 1)")
            if text_out not in ("all", "cls", "none") or image_out not in ("all", "cls", "none"):
                raise ValueError(f"text_out/image_out must be 'all', 'cls' or 'none', got {text_out!r}/{image_out!r}")
            out = self.text(text, text_mask, image.tokens, image_mask, return_cross=return_attention,
                            last_queries=1 if text_out == "cls" else None)
            h = out.hidden
            return FusionOutput(None if text_out == "none" else h, None, h[:, 0], out.cross_attentions, [])
        return self.fusion(text, text_mask, image.tokens, image.num_frames, image_token_type=image_token_type,
                           return_attention=return_attention, text_out=text_out, image_out=image_out,
                           image_mask=image_mask)

    @property
    def fusion_layers(self) -> nn.ModuleList:
        """The layers that attend across modalities (Grad-CAM, ALIGN-BENCH index these)."""
        return self.text.layers if self.family == "single_stream" else self.fusion.layers

    def text_to_image_attention(self, layer: int) -> nn.Module:
        """The module computing fusion layer `layer`'s text->image cross-attention; its forward returns
        (output, probabilities) when the fusion is called with return_attention=True."""
        if self.family == "single_stream":
            return self.text.layers[layer].crossattention
        return self.fusion.layers[layer].text.cross_attn

    def _need(self, head: str) -> None:
        if head not in self.heads:
            raise ValueError(f"this model has no {head!r} head (model.heads / the enabled objectives decide)")

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, E) L2-normalised retrieval embeddings (zero-shot evaluation)."""
        self._need("itc")
        return image_embedding(self._module, pixel_values)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._need("itc")
        return text_embedding(self._module, input_ids, attention_mask)

    def _module(self, name: str) -> Optional[nn.Module]:
        return self.get_submodule(name) if name in self.retrieval_modules else None

    def layer_stacks(self) -> dict[str, list[nn.Module]]:
        stacks = {"vision": list(self.vision.blocks), "text": list(self.text.layers)}
        if self.family != "single_stream":
            stacks["fusion"] = list(self.fusion.layers)
        return stacks

    def no_weight_decay(self) -> set[str]:
        names = {f"vision.{n}" for n in self.vision.no_weight_decay()}
        if "itc" in self.heads:
            names.add(f"itc.{self.itc.temperature_name()}")
        return names


def _single_stream_sizes(cfg: ModelConfig) -> dict:
    from models.single_stream import _hf_config

    return _hf_config(cfg.text)


def pooled_dim(cfg: ModelConfig) -> int:
    """Width of `fuse(...).cls_feats` for this config, without building it (task heads are sized by it)."""
    if cfg.family == "single_stream":
        return int(_single_stream_sizes(cfg)["hidden_size"])
    return 2 * cfg.fusion.hidden_size


def fusion_depth(cfg: ModelConfig) -> int:
    """Number of cross-modal layers (`VLPBackbone.fusion_layers`) for this config, without building it."""
    if cfg.family == "single_stream":
        return int(_single_stream_sizes(cfg)["num_hidden_layers"])
    return cfg.fusion.num_layers


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
