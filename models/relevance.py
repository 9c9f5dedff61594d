"""The momentum model's fusion of the full image with the caption, and the text -> patch relevance it gives.

One shared no-grad pass (methods.md §3): SemMIM reads the text-injected momentum patch features as its MIM targets and
the relevance as its text-guided masking probabilities; GLSCL's MGSC (pass A's dropped patches) and MLTC (pass C's
mask-token positions) read the relevance when their `image_masking` is `text_guided`. Computed once per step whoever
reads it, on the momentum copies of the towers and input projections (MomentumEncoding) and of the fusion layers and
type embeddings (this pass's momentum modules).

  relevance_i = A[query -> patch i] of the last momentum fusion layer, heads averaged; query = the caption CLS
                (`relevance: cls`) or the mean over the caption's words (`words`; special tokens and padding excluded,
                a caption without words falls back to its CLS). Video: the mean over frames of the same patch
                position (the masks that read it are tubes: one position masked in every frame).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from models.passes import MomentumEncoding, Pass

RELEVANCE_SOURCES = ("cls", "words")


class MomentumFusionOut(NamedTuple):
    image: torch.Tensor       # (B, F(1+N), D) momentum image tokens after the fusion's input projection
    fused: torch.Tensor       # (B, F(1+N), D) the momentum fusion's image stream (caption injected)
    relevance: torch.Tensor   # (B, N) text -> patch attention (float32), one value per patch position


def momentum_fusion(m, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, text_queries: int):
    """The momentum fusion layers on projected momentum tokens -> (last image-stream tokens, the last layer's
    text -> image attention (B, heads, text_queries or Lt, Nv)). Mirrors FusionEncoder.forward on the momentum copies
    of fusion.layers and fusion.token_type (the poolers are not needed); the copies' own modules run, so that ZeRO-3
    gathers their parameters."""
    layers, token_type = m.copy_of("fusion.layers"), m.copy_of("fusion.token_type")
    types = token_type(torch.arange(2, device=text.device))
    t, v, mask = text + types[0], image + types[1], text_mask.bool()
    last = len(layers) - 1
    for i, block in enumerate(layers):
        t, v, t2v, _ = block(t, mask, v, None, i == last, text_queries if i == last else -1, -1)
    return v, t2v


class MomentumFusion(Pass):
    """Settings (all readers must agree): `relevance` ("cls" | "words") and `coefficient` (the EMA momentum, the
    same as MomentumEncoding's)."""
    name, kind = "momentum_fusion", "no_grad"
    momentum_modules = ("fusion.layers", "fusion.token_type")

    def __init__(self, special_ids: list[int], **settings):
        super().__init__(**settings)
        self.register_buffer("special_ids", torch.tensor(special_ids, dtype=torch.long), persistent=False)

    @classmethod
    def create(cls, env, **settings) -> "MomentumFusion":
        return cls(env.special_ids, **settings)

    @classmethod
    def require(cls, env, relevance: str, coefficient: float) -> "MomentumFusion":
        """For a reader's constructor: this pass and the MomentumEncoding it reads, with these settings."""
        if relevance not in RELEVANCE_SOURCES:
            raise ValueError(f"relevance: expected one of {RELEVANCE_SOURCES}, got {relevance!r}")
        env.use(MomentumEncoding, coefficient=coefficient)
        return env.use(cls, relevance=relevance, coefficient=coefficient)

    @torch.no_grad()
    def compute(self, ctx) -> MomentumFusionOut:
        m = ctx.model.momentum
        ids, amask = ctx.input_ids, ctx.attention_mask
        enc = ctx.get(MomentumEncoding)   # the momentum towers, run once for every reader
        tokens = enc.image_tokens
        image = m.copy_of("fusion.image_in")(tokens.tokens)
        text = m.copy_of("fusion.text_in")(enc.text_tokens)
        words = self.settings["relevance"] == "words"
        fused, att = momentum_fusion(m, text, amask, image, -1 if words else 1)
        f = tokens.num_frames
        att = att.float().mean(1)[..., f:]   # (B, Lq, F N): heads averaged, the frame CLS columns dropped
        att = att.unflatten(-1, (f, att.shape[-1] // f)).mean(-2)   # (B, Lq, N): frames averaged
        if words:
            w = (amask.bool() & ~torch.isin(ids, self.special_ids)).float()
            w[:, 0] += (w.sum(1) == 0).float()   # a caption without words falls back to its CLS
            relevance = (att * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        else:
            relevance = att[:, 0]
        return MomentumFusionOut(image, fused, relevance)
