"""Shared passes: what objectives read besides the batch, each computed at most once per step.

An objective declares the passes it reads (`reads`) and publishes (`publishes`) as classes of this module (or of its
own file, for a pass only its paper uses, e.g. GLSCL's masked passes). The composing model creates one instance of
each declared pass; `StepContext.get(Kind)` computes it on first use and caches it for the rest of the step. Objectives
hand data to each other only through published passes (ITC/ITA publish their similarities, ITM reads them), never
through a string-keyed scratch dict.

Kinds (`Pass.kind`), which also tell train/flops.py how to attribute FLOPs without naming any objective:
  "encoding"   the unmasked encoders: computed once, gradients from every reader flow back through them once
  "pass"       a shared forward with gradient (e.g. GLSCL's passes A/B): its readers' losses are one backward group
  "no_grad"    computed without gradient (momentum encoders)
  "published"  written by one objective (`StepContext.publish`), read by later ones; None when nobody publishes it
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn as nn

from models.backbone import ImageTokens, image_embedding, text_embedding


class Pass(nn.Module):
    """One shared pass. A module, so that its buffers (e.g. special token ids) follow the model's device; it holds
    no parameters. Settings: objectives call `BuildEnv.use(Kind, **settings)`; all users must agree."""

    name: ClassVar[str]
    kind: ClassVar[str] = "pass"
    momentum_modules: ClassVar[tuple[str, ...]] = ()   # backbone submodules it needs momentum copies of

    def __init__(self, **settings):
        super().__init__()
        self.settings = dict(settings)

    @classmethod
    def create(cls, env, **settings) -> "Pass":
        """The instance for a model being built (`env`: models.objectives.base.BuildEnv); override to take what the
        pass needs from the backbone or tokenizer."""
        return cls(**settings)

    def compute(self, ctx: "StepContext") -> Any:
        raise NotImplementedError(f"{type(self).__name__}: a computed pass implements compute(ctx)")

    def configure(self, **settings) -> None:
        """A later user's settings: take the ones not yet set, refuse ones that disagree."""
        for k, v in settings.items():
            if k in self.settings and self.settings[k] != v:
                raise ValueError(f"shared pass {self.name!r}: its users disagree on {k}: {self.settings[k]!r} vs "
                                 f"{v!r} (they share one pass, so they must use the same value)")
            self.settings[k] = v


class ImageEncoding(Pass):
    """The unmasked image through the vision tower and the fusion's image input projection."""
    name, kind = "image", "encoding"

    def compute(self, ctx) -> ImageTokens:
        return ctx.model.encode_image(ctx.pixel_values)


class TextEncoding(Pass):
    """(B, L, D) the unmasked text through the text tower and the fusion's text input projection."""
    name, kind = "text", "encoding"

    def compute(self, ctx) -> torch.Tensor:
        return ctx.model.encode_text(ctx.input_ids, ctx.attention_mask)


class Scores(NamedTuple):
    i2t: torch.Tensor   # (B, B) this rank's images vs this rank's texts, detached
    t2i: torch.Tensor


class ContrastiveScores(Pass):
    """Local image-text similarities of the contrastive objective (ITC or ITA); ITM draws hard negatives from
    them."""
    name, kind = "contrastive_scores", "published"


class MomentumFeatures(NamedTuple):
    image: Optional[torch.Tensor]   # (B, E) L2-normalised retrieval embeddings of the momentum encoders (None
    text: Optional[torch.Tensor]    # without an ITC head: a reader that only needs the tokens)
    image_tokens: ImageTokens   # the momentum vision tower's output (before any fusion input projection)
    text_tokens: torch.Tensor   # (B, L, D) the momentum text tower's output in text mode (before any projection)


class MomentumEncoding(Pass):
    """The batch through the momentum (EMA) copies of the towers, input projections and ITC head (the family's
    retrieval path); no gradient. Setting: `coefficient` (the EMA momentum; the engine's after-step hook applies it)."""
    name, kind = "momentum", "no_grad"

    @classmethod
    def create(cls, env, **settings) -> "MomentumEncoding":
        inst = cls(**settings)
        heads = env.backbone.heads
        inst.momentum_modules = tuple(n for n in env.backbone.retrieval_modules if n != "itc" or "itc" in heads)
        return inst

    def compute(self, ctx) -> MomentumFeatures:
        m = ctx.model.momentum
        get = lambda name: m.copy_of(name) if name in self.momentum_modules else None
        with torch.no_grad():
            out = get("vision")(ctx.pixel_values)
            tokens = ImageTokens(out.tokens, out.num_frames)
            text_tower = get("text")
            hidden = getattr(text_tower, "encode", text_tower)(ctx.input_ids, ctx.attention_mask)
            image = text = None
            if "itc" in self.momentum_modules:
                image = image_embedding(get, ctx.pixel_values, tokens)
                text = text_embedding(get, ctx.input_ids, ctx.attention_mask, hidden)
        return MomentumFeatures(image, text, tokens, hidden)


class StepContext:
    """One step's batch and the shared passes computed from it (each at most once)."""

    def __init__(self, model, batch: dict):
        self.model = model
        self.pixel_values = batch["pixel_values"]
        self.input_ids = batch["input_ids"]
        self.attention_mask = batch["attention_mask"]
        # MLM inputs masked by the data workers (data.mlm_probability), if they did.
        self.mlm_input_ids, self.mlm_labels = batch.get("mlm_input_ids"), batch.get("mlm_labels")
        self.step: Optional[int] = batch.get("step")   # the optimizer step being computed (set by the engine)
        # fine-tuning retrieval: (B,) id of each sample's image; samples sharing one are positives of each other in
        # ITC and never each other's ITM negatives (ALBEF's `idx`). None: every sample is its own image.
        self.image_ids: Optional[torch.Tensor] = batch.get("image_ids")
        self.batch = batch   # an objective's own batch keys (its `batch_keys`), e.g. MIM's tokenizer_pixels
        self.gather = model.gather
        self.values: dict[str, Any] = {}

    def _instance(self, kind: type[Pass]) -> Pass:
        passes = self.model.passes
        if kind.name not in passes:
            raise ValueError(f"shared pass {kind.name!r} was read but no enabled objective declares it in `reads`")
        return passes[kind.name]

    def get(self, kind: type[Pass]) -> Any:
        if kind.name not in self.values:
            p = self._instance(kind)
            self.values[kind.name] = None if p.kind == "published" else p.compute(self)
        return self.values[kind.name]

    def publish(self, kind: type[Pass], value) -> None:
        if self._instance(kind).kind != "published":
            raise ValueError(f"shared pass {kind.name!r} is computed, not published")
        self.values[kind.name] = value

    # The two encodings nearly every objective reads.
    @property
    def image(self) -> ImageTokens:
        return self.get(ImageEncoding)

    @property
    def text(self) -> torch.Tensor:
        return self.get(TextEncoding)

    @property
    def fusion_text(self) -> torch.Tensor:
        """(B, L, D) the fusion's text input for the unmasked caption (backbone.fusion_text): the text encoding
        itself in the coattention family, the caption embeddings in the single-stream one."""
        if "fusion_text" not in self.values:
            m = self.model
            self.values["fusion_text"] = self.text if m.fuses_text_encoding else m.fusion_text(self.input_ids,
                                                                                             self.attention_mask)
        return self.values["fusion_text"]

    @property
    def num_frames(self) -> int:
        return self.image.num_frames
