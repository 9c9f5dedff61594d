"""GLSCL's self-supervised cross-modal objectives: MGSC (global, = SCL) and MLTC (local tokens). methods.md §1.3.

Both read two fusion passes shared through the StepContext (`GlsclPasses`, declared here), computed once per step:
  pass A = F(image with 80% of patches dropped MAE-style, full text)
  pass B = F(full image, text with 40% of tokens replaced by the mask token)
MLTC adds pass C = F(image with 30% of patch embeddings replaced by a learnable mask token, full text).
Features are raw fusion outputs (before the poolers); `sg` = detach.

MGSC: L = nce(ag(h^v_0(A)), ag(sg h^v_0(B))) + nce(ag(h^t_0(B)), ag(sg h^t_0(A)))
      (video: the image term is computed per frame CLS and averaged over frames). `text_negatives: local` computes
      the text term on this rank's batch instead, as the released GLSCL code does (its SCL-era code gathered both).
MLTC: L = image_weight * nce(h^v(C)[m_v], sg h^v(B)[m_v])                 (local batch, patch tokens)
        + text_weight  * nce(ag(h^t(B))[ag(m_t)], ag(sg h^t(A))[ag(m_t)])  (global batch)
      negatives are all other masked tokens in the (local/global) batch, the same sample's included.
nce = SCL's NormSoftmaxLoss at the fixed temperature 0.03: the SUM of both directions.

`image_masking: text_guided` (MGSC: pass A's dropped patches; MLTC: pass C's mask-token positions) draws
round(text_guided_ratio x the count) of the masked patches with probability proportional to the momentum model's
text -> patch relevance (SemMIM's text-guided masking, models/relevance.py) and the rest uniformly; the count is the
random masking's. It adds the momentum encoders (EMA `momentum`) and one no-grad momentum fusion pass per step, shared
with SemMIM when both run. Ours: SemMIM's masking applied to GLSCL's passes (neither paper does this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import gathered_grad
from models.fusion import FusionOutput
from models.masking import (mask_text_for_completion, num_kept, random_keep_indices, random_token_mask,
                            text_guided_mask)
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import ImageEncoding, Pass, TextEncoding
from models.relevance import RELEVANCE_SOURCES, MomentumFusion


def nce(p: torch.Tensor, g: torch.Tensor, tau: float) -> torch.Tensor:
    """SCL's NormSoftmaxLoss in fp32: rows L2-normalised, S = p g^T / tau, CE(S, i) + CE(S^T, i) (summed)."""
    p, g = F.normalize(p.float(), dim=-1), F.normalize(g.float(), dim=-1)
    s = p @ g.T / tau
    labels = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)


def _check_ratio(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


@dataclass
class ImageMasking:
    """Which patches an objective masks (fields shared by MGSC's and MLTC's configs)."""
    image_masking: Literal["random", "text_guided"] = "random"
    text_guided_ratio: float = 0.5   # ours: the share of the masked patches drawn by relevance, the rest uniform
    relevance: Literal["cls", "words"] = "cls"   # the relevance's query: the caption CLS or the words' mean
    momentum: float = 0.995          # the momentum encoders' EMA (text_guided only; must equal other users')

    def validate_masking(self, prefix: str) -> None:
        if self.image_masking not in ("random", "text_guided"):
            raise ValueError(f"{prefix}.image_masking: expected 'random' or 'text_guided', got {self.image_masking!r}")
        if not 0 <= self.text_guided_ratio <= 1:
            raise ValueError(f"{prefix}.text_guided_ratio must be in [0, 1], got {self.text_guided_ratio}")
        if self.relevance not in RELEVANCE_SOURCES:
            raise ValueError(f"{prefix}.relevance: expected one of {RELEVANCE_SOURCES}, got {self.relevance!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{prefix}.momentum must be in [0, 1), got {self.momentum}")

    def momentum_used(self) -> Optional[float]:
        return self.momentum if self.image_masking == "text_guided" else None

    def use_relevance(self, env) -> bool:
        if self.image_masking == "text_guided":
            MomentumFusion.require(env, self.relevance, self.momentum)
        return self.image_masking == "text_guided"


def guided_mask(ctx, num_masked: int, guided_ratio: float) -> torch.Tensor:
    """(B, P) bool, exactly num_masked True per row, drawn by the momentum model's text -> patch relevance."""
    return text_guided_mask(ctx.get(MomentumFusion).relevance, num_masked, guided_ratio)


@dataclass
class MgscConfig(ImageMasking):
    weight: float = 1.0
    temperature: float = 0.03  # fixed; SCL HEAD reads an undefined msm_temp, 928b1cd had scl_temp = 0.03 (§1.9)
    image_mask_ratio: float = 0.8  # fraction of patches dropped in pass A
    text_mask_ratio: float = 0.4  # fraction of real, non-special tokens masked in pass B
    # "exact": exactly 40% of the tokens, drawn without replacement (the paper); "with_replacement": the released
    # code's int(0.4 n) + 1 draws with replacement (fewer distinct tokens; the paper presets' parity setting).
    text_mask_sampling: Literal["exact", "with_replacement"] = "exact"
    # "global": the text term's negatives come from every rank's batch (the paper, SCL's first code); "local": this
    # rank's batch only (the released GLSCL code takes the CLS features before its all-gather)
    text_negatives: Literal["global", "local"] = "global"

    def validate(self) -> None:
        check_weight("objectives.mgsc.weight", self.weight)
        if self.text_negatives not in ("global", "local"):
            raise ValueError(f"objectives.mgsc.text_negatives: expected 'global' or 'local', got "
                             f"{self.text_negatives!r}")
        if self.temperature <= 0:
            raise ValueError(f"objectives.mgsc.temperature must be > 0, got {self.temperature}")
        _check_ratio("objectives.mgsc.image_mask_ratio", self.image_mask_ratio)
        _check_ratio("objectives.mgsc.text_mask_ratio", self.text_mask_ratio)
        self.validate_masking("objectives.mgsc")


@dataclass
class MltcConfig(ImageMasking):
    weight: float = 1.0
    temperature: float = 0.03
    image_token_mask_ratio: float = 0.3  # fraction of patch embeddings replaced by the mask token in pass C
    image_weight: float = 0.2
    text_weight: float = 0.2
    # the image mask token's init: "small" = trunc-normal std 0.02, the ViT's own cls/pos scale (BEiT/SimMIM);
    # "randn" = N(0, 1), the released code's
    mask_token_init: Literal["small", "randn"] = "small"

    def validate(self) -> None:
        check_weight("objectives.mltc.weight", self.weight)
        if self.mask_token_init not in ("small", "randn"):
            raise ValueError(f"objectives.mltc.mask_token_init: expected 'small' or 'randn', got "
                             f"{self.mask_token_init!r}")
        if self.temperature <= 0:
            raise ValueError(f"objectives.mltc.temperature must be > 0, got {self.temperature}")
        _check_ratio("objectives.mltc.image_token_mask_ratio", self.image_token_mask_ratio)
        check_weight("objectives.mltc.image_weight", self.image_weight)
        check_weight("objectives.mltc.text_weight", self.text_weight)
        self.validate_masking("objectives.mltc")


class GlsclPassesOut(NamedTuple):
    a: FusionOutput            # fusion(image with image_mask_ratio of its patches dropped, full text)
    b: FusionOutput            # fusion(full image, text with text_mask_ratio of its tokens masked)
    keep: torch.Tensor         # (B, K) kept patch indices of A
    text_mask: torch.Tensor    # (B, L) bool, the masked text positions of B
    masked_ids: torch.Tensor   # (B, L) B's text ids


class GlsclPasses(Pass):
    """GLSCL's masked passes A and B, shared by MGSC and MLTC. Settings (all users must agree): image_mask_ratio,
    text_mask_ratio, text_mask_sampling, image_masking, text_guided_ratio (MGSC's config; the defaults when only MLTC
    runs) and tokens ("cls": the last fusion layer computes only the CLS tokens MGSC reads; "all": MLTC also reads
    every token)."""
    name, kind = "glscl", "pass"
    defaults = dict(image_mask_ratio=MgscConfig.image_mask_ratio, text_mask_ratio=MgscConfig.text_mask_ratio,
                    text_mask_sampling=MgscConfig.text_mask_sampling, image_masking=MgscConfig.image_masking,
                    text_guided_ratio=MgscConfig.text_guided_ratio)

    def __init__(self, mask_token_id: int, special_ids: list[int], **settings):
        super().__init__(**settings)
        self.mask_token_id = mask_token_id
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)

    @classmethod
    def create(cls, env, **settings) -> "GlsclPasses":
        return cls(env.tokenizer.mask_token_id, env.special_ids, **settings)

    def setting(self, key: str):
        return self.settings.get(key, self.defaults.get(key))

    def compute(self, ctx) -> GlsclPassesOut:
        model = ctx.model
        patches, keep_ratio = model.vision.num_patches, 1.0 - self.setting("image_mask_ratio")
        if self.setting("image_masking") == "text_guided":   # drop as many patches as random dropping would
            kept = num_kept(patches, keep_ratio)
            dropped = guided_mask(ctx, patches - kept, self.setting("text_guided_ratio"))
            keep = dropped.float().argsort(dim=1, stable=True)[:, :kept].sort(dim=1).values
        else:
            keep = random_keep_indices(ctx.pixel_values.shape[0], patches, keep_ratio, ctx.pixel_values.device)
        # Read from A: frame CLS (MGSC) and text tokens (MLTC targets, MGSC text target = its CLS);
        # from B: text and frame CLS (MGSC), plus all tokens when MLTC runs. The last fusion layer computes only those.
        tokens = self.settings.get("tokens", "cls")
        image_a = model.encode_image(ctx.pixel_values, keep=keep)
        a = model.fuse(ctx.text, ctx.attention_mask, image_a, text_out=tokens, image_out="cls")
        masked_ids, text_mask = mask_text_for_completion(
            ctx.input_ids, ctx.attention_mask, self.special_ids, self.mask_token_id, self.setting("text_mask_ratio"),
            with_replacement=self.setting("text_mask_sampling") == "with_replacement")
        b = model.fuse(model.encode_text(masked_ids, ctx.attention_mask), ctx.attention_mask, ctx.image,
                       text_out=tokens, image_out=tokens)
        return GlsclPassesOut(a, b, keep, text_mask, masked_ids)


class MGSC(Objective):
    name, Config = "mgsc", MgscConfig
    reads = (ImageEncoding, TextEncoding, GlsclPasses)
    families = ("coattention",)   # its passes read the image stream's fusion outputs

    def __init__(self, cfg: MgscConfig, env: BuildEnv):
        super().__init__(cfg, env)
        env.use(GlsclPasses, image_mask_ratio=cfg.image_mask_ratio, text_mask_ratio=cfg.text_mask_ratio,
                    text_mask_sampling=cfg.text_mask_sampling, image_masking=cfg.image_masking,
                    text_guided_ratio=cfg.text_guided_ratio)
        cfg.use_relevance(env)

    @classmethod
    def momentum_coefficient(cls, cfg) -> Optional[float]:
        return cfg.momentum_used()

    def forward(self, ctx) -> ObjectiveOutput:
        p = ctx.get(GlsclPasses)
        a, b = p.a, p.b
        f, tau = ctx.num_frames, self.cfg.temperature
        # Image: prediction = frame-CLS of A (image masked), target = sg(frame-CLS of B); per frame, mean over frames.
        g = ctx.gather
        image = sum(nce(g(a.image[:, i]), g(b.image[:, i].detach()), tau) for i in range(f)) / f
        # Text: prediction = text CLS of B (text masked), target = sg(text CLS of A).
        if self.cfg.text_negatives == "local":
            text = nce(b.text[:, 0], a.text[:, 0].detach(), tau)
        else:
            text = gathered_grad(nce(g(b.text[:, 0]), g(a.text[:, 0].detach()), tau), g)
        image = gathered_grad(image, g)
        return ObjectiveOutput({"mgsc": image + text},
                               {"mgsc_image": image.detach(), "mgsc_text": text.detach()})


class MLTC(Objective):
    """Reuses MGSC's passes A and B, so it masks with MGSC's ratios (the defaults when MGSC is off)."""
    name, Config = "mltc", MltcConfig
    reads = (ImageEncoding, TextEncoding, GlsclPasses)
    families = ("coattention",)

    def __init__(self, cfg: MltcConfig, env: BuildEnv):
        super().__init__(cfg, env)
        env.use(GlsclPasses, tokens="all")
        self.guided = cfg.use_relevance(env)
        # SCL's code initialises visual_mask_token with randn (N(0, 1)); by default we use trunc-normal std 0.02 like
        # the ViT's own cls/pos embeddings (BEiT/SimMIM), so the masked embedding is on the patch embeddings' scale.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, env.backbone.vision.embed_dim))
        if cfg.mask_token_init == "randn":
            nn.init.normal_(self.mask_token)
        else:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    @classmethod
    def momentum_coefficient(cls, cfg) -> Optional[float]:
        return cfg.momentum_used()

    def forward(self, ctx) -> ObjectiveOutput:
        p = ctx.get(GlsclPasses)
        a, b = p.a, p.b
        c = self.cfg
        f, bsz = ctx.num_frames, ctx.pixel_values.shape[0]
        model = ctx.model
        num_patches = model.vision.num_patches
        if self.guided:   # as many positions as random_token_mask masks
            n = max(1, min(num_patches, int(c.image_token_mask_ratio * num_patches + 1e-6)))
            token_mask = guided_mask(ctx, n, c.text_guided_ratio)
        else:
            token_mask = random_token_mask(bsz, num_patches, c.image_token_mask_ratio, ctx.pixel_values.device)
        self.last_token_mask = token_mask   # for inspection (tests); not state
        image_c = model.encode_image(ctx.pixel_values, token_mask=token_mask, mask_token=self.mask_token)
        pass_c = model.fuse(ctx.text, ctx.attention_mask, image_c, text_out="none")  # only image tokens are read
        # Image tokens (local batch): patch tokens of C at the masked positions vs sg(B's) at the same positions;
        # tube: a masked position is masked in every frame.
        patches = lambda t: t[:, f:].unflatten(1, (f, num_patches))  # (B, F, P, D)
        m_v = token_mask[:, None, :].expand(bsz, f, num_patches)
        image = nce(patches(pass_c.image)[m_v], patches(b.image).detach()[m_v], c.temperature)
        # Text tokens (global batch): B's text tokens at the masked positions vs sg(A's) at the same positions.
        m_t = ctx.gather(p.text_mask.to(torch.uint8)).bool()
        pred, target = ctx.gather(b.text)[m_t], ctx.gather(a.text.detach())[m_t]
        if m_t.any():
            text = gathered_grad(nce(pred, target, c.temperature), ctx.gather)
        else:  # every caption empty: no masked token anywhere (SCL skips the NaN term)
            text = b.text.float().sum() * 0.0
        return ObjectiveOutput({"mltc_image": c.image_weight * image, "mltc_text": c.text_weight * text},
                               {"mltc_image_nce": image.detach(), "mltc_text_nce": text.detach()})
