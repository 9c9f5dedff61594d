"""Image-text contrastive loss (ITC) over the batch gathered from every rank.

Each rank scores its own rows against all gathered columns (labels offset by rank); the trainer's gather carries the
gradient back to the rank that produced each column, so the result equals the full-batch loss
(`train.gathered_grad: official` scales the features' gradient as the released SCL code does: models/backbone.py
gathered_grad). The temperature is the backbone's (models/backbone.py ContrastiveHead: learnable, log-parameterised
and clamped to model.itc's [min, max], or raw). Publishes the local similarities for ITM's hard negatives.
With `image_ids` in the batch (retrieval fine-tuning, several captions per image) every pair showing the same image
is a positive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.backbone import gathered_grad
from models.objectives.base import Objective, ObjectiveOutput, check_weight
from models.passes import ContrastiveScores, ImageEncoding, Scores, TextEncoding


@dataclass
class ItcConfig:
    weight: float = 1.0   # the projections and temperature are the backbone's (model.itc)

    def validate(self) -> None:
        check_weight("objectives.itc.weight", self.weight)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits)); equals F.cross_entropy for one-hot targets."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class ITC(Objective):
    name, Config = "itc", ItcConfig
    reads = (ImageEncoding, TextEncoding)
    publishes = (ContrastiveScores,)
    heads = ("itc",)
    pretrain_only = False   # its parameters are the backbone's; retrieval fine-tuning uses the same loss

    def forward(self, ctx) -> ObjectiveOutput:
        zi, zt, tau = ctx.model.itc(ctx.image.global_, ctx.text[:, 0])
        zi, zt = gathered_grad(zi, ctx.gather), gathered_grad(zt, ctx.gather)   # the temperature keeps its own
        all_i, all_t = ctx.gather(zi), ctx.gather(zt)
        labels = torch.arange(zi.shape[0], device=zi.device) + ctx.gather.rank * zi.shape[0]
        i2t = zi @ all_t.T / tau
        t2i = zt @ all_i.T / tau
        if ctx.image_ids is None:
            loss = (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
        else:   # every column showing the same image is a positive, weighted equally (ALBEF's fine-tuning targets)
            ids = ctx.image_ids.to(zi.device)
            pos = (ids[:, None] == ctx.gather(ids)[None, :]).float()
            targets = pos / pos.sum(1, keepdim=True)
            loss = (soft_cross_entropy(i2t, targets) + soft_cross_entropy(t2i, targets)) / 2
        local = slice(ctx.gather.rank * zi.shape[0], (ctx.gather.rank + 1) * zi.shape[0])
        ctx.publish(ContrastiveScores, Scores(i2t[:, local].detach(), t2i[:, local].detach()))
        return ObjectiveOutput({"itc": loss}, {"itc_temperature": tau.detach()})
