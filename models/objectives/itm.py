"""Image-text matching (ITM) with hard negatives sampled from ITC similarities.

For every image one negative text and for every text one negative image are drawn with probability softmax(sim)
over the other samples of the local batch (ALBEF-style); pairs whose captions are identical are never drawn as
negatives. Rows whose weights are degenerate (non-finite, zero mass) fall back to uniform sampling, so a collapsed
similarity matrix cannot crash `torch.multinomial` (ALBEF#93). Positives and both kinds of negatives go through the
fusion encoder in one call of 3B pairs. The similarities are whatever contrastive objective publishes them (ITC or
ITA, `ContrastiveScores`); without one in the step, negatives are uniform. The head is the backbone's `itm_head`.

`pairs: b` instead makes one fusion call of exactly B pairs, the cost of the official SCL code's single ITM pass:
a random B//2 of the samples (torch.randperm) become negatives, half of them (rounded down) with a negative text
and the rest with a negative image, drawn by the same `sample_negatives`; the other samples stay positive pairs.
`negative_side: image` (with `pairs: b`) is the released SCL code's rule: B - B//2 random samples keep their text
and get another sample's image, B//2 stay positive. With `hard_negatives: false` that image is drawn uniformly from
the other samples of the micro batch (the released code draws a random image of the dataset, `false_image_0`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.backbone import ImageTokens
from models.objectives.base import Objective, ObjectiveOutput, check_weight
from models.passes import ContrastiveScores, ImageEncoding, TextEncoding


@dataclass
class ItmConfig:
    weight: float = 1.0
    hard_negatives: bool = True
    pairs: Literal["3b", "b"] = "3b"  # "3b": B positives + B negative texts + B negative images; "b": B pairs, B//2 negative
    # pairs b: "both" = half the negatives get another text, half another image; "image" = the released code's rule
    negative_side: Literal["both", "image"] = "both"

    def validate(self) -> None:
        check_weight("objectives.itm.weight", self.weight)
        if self.pairs not in ("3b", "b"):
            raise ValueError(f"objectives.itm.pairs: expected '3b' or 'b', got {self.pairs!r}")
        if self.negative_side not in ("both", "image"):
            raise ValueError(f"objectives.itm.negative_side: expected 'both' or 'image', got {self.negative_side!r}")
        if self.negative_side == "image" and self.pairs != "b":
            raise ValueError("objectives.itm.negative_side: 'image' needs objectives.itm.pairs: b")


def sample_negatives(sim: torch.Tensor | None, forbidden: torch.Tensor) -> torch.Tensor:
    """One index per row, never a forbidden column; sim (B, B) scores or None for uniform."""
    b = forbidden.shape[0]
    allowed = ~forbidden
    if sim is None:
        weights = allowed.float()
    else:
        weights = torch.softmax(sim.float().masked_fill(forbidden, float("-inf")), dim=1)
        weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0) * allowed
        bad = weights.sum(1) <= 0
        weights[bad] = allowed[bad].float()
    stuck = weights.sum(1) <= 0  # every other sample has the same caption: take any other sample
    if stuck.any():
        weights[stuck] = (~torch.eye(b, dtype=torch.bool, device=forbidden.device))[stuck].float()
    return torch.multinomial(weights, 1).squeeze(1)


class ITM(Objective):
    name, Config = "itm", ItmConfig
    reads = (ImageEncoding, TextEncoding, ContrastiveScores)
    heads = ("itm",)   # the backbone's ITM head (kept for fine-tuning: retrieval re-ranking starts from it)
    pretrain_only = False   # its parameters are the backbone's; retrieval fine-tuning uses the same loss

    @classmethod
    def official_config(cls, cfg):
        return dataclasses.replace(cfg, pairs="b")   # the official SCL code makes one fusion pass of B pairs

    @classmethod
    def check_run(cls, cfg, run) -> None:
        if run.train.micro_batch_size < 2:
            raise ValueError(f"train.micro_batch_size: objectives.itm draws its negatives within a micro batch, so "
                             f"it needs at least 2 samples, got {run.train.micro_batch_size}")

    def forward(self, ctx) -> ObjectiveOutput:
        ids, mask = ctx.input_ids, ctx.attention_mask
        b = ids.shape[0]
        if b < 2:
            raise ValueError("ITM needs at least 2 samples per micro-batch to draw negatives")
        with torch.no_grad():
            same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # identical captions (diagonal included)
            img = getattr(ctx, "image_ids", None)
            if img is not None:   # fine-tuning: another caption of the same image is no negative either
                img = img.to(ids.device)
                same |= img[:, None] == img[None, :]
            scores = ctx.get(ContrastiveScores) if self.cfg.hard_negatives else None
            neg_text = sample_negatives(None if scores is None else scores.i2t, same)
            neg_image = sample_negatives(None if scores is None else scores.t2i, same)
        text, image = ctx.fusion_text, ctx.image.tokens
        fuse = lambda t, m, v: ctx.model.fuse(t, m, ImageTokens(v, ctx.num_frames), text_out="cls", image_out="cls")
        if self.cfg.pairs == "b":
            with torch.no_grad():
                if self.cfg.negative_side == "image":   # released: B//2 positives, the rest get another image
                    neg = torch.randperm(b, device=ids.device)[b // 2:]
                    swap_text, swap_image = neg[:0], neg
                else:
                    neg = torch.randperm(b, device=ids.device)[: b // 2]
                    swap_text, swap_image = neg[: neg.numel() // 2], neg[neg.numel() // 2:]
                text_idx = torch.arange(b, device=ids.device)
                image_idx = torch.arange(b, device=ids.device)
                text_idx[swap_text] = neg_text.to(ids.device)[swap_text]
                image_idx[swap_image] = neg_image.to(ids.device)[swap_image]
                labels = torch.ones(b, dtype=torch.long, device=ids.device)
                labels[neg] = 0
            out = fuse(text[text_idx], mask[text_idx], image[image_idx])
        else:
            out = fuse(torch.cat([text, text[neg_text], text]), torch.cat([mask, mask[neg_text], mask]),
                       torch.cat([image, image, image[neg_image]]))
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
        logits = ctx.model.itm_head(out.cls_feats).float()   # the head reads only the pooled CLS features
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return ObjectiveOutput({"itm": loss}, {"itm_acc": acc.detach()})
