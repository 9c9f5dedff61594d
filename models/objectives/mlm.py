"""Masked language modelling conditioned on the image (MLM).

BERT masking: each real, non-special token is selected with probability mask_prob; of those 80% become the mask
token, 10% a random token, 10% stay. Special tokens and padding are never selected. The logits are computed only at
selected positions (the vocabulary projection is the costliest part of the head).
With `data.mlm_probability` set, the data workers apply the same rule and the batch carries `mlm_input_ids` and
`mlm_labels`; the objective then uses those instead of masking on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads import MLMHead
from models.objectives.base import ObjectiveOutput, check_weight


@dataclass
class MlmConfig:
    weight: float = 1.0
    mask_prob: float = 0.15

    def validate(self) -> None:
        check_weight("objectives.mlm.weight", self.weight)
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"objectives.mlm.mask_prob must be in (0, 1), got {self.mask_prob}")


def mask_tokens(ids, attention_mask, special_ids, mask_token_id: int, vocab_size: int, prob: float,
                generator=None):
    """-> (masked ids, labels with -100 where not selected). At least one token per batch is selected."""
    candidates = attention_mask.bool() & ~torch.isin(ids, special_ids)
    draw = lambda: torch.rand(ids.shape, device=ids.device, generator=generator)
    selected = (draw() < prob) & candidates
    if not selected.any() and candidates.any():  # never return an empty loss
        first = candidates.flatten().nonzero()[0]
        selected.view(-1)[first] = True
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    u = draw()
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, device=ids.device, generator=generator)
    masked = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


class MLM(nn.Module):
    def __init__(self, cfg: MlmConfig, dim: int, vocab_size: int, mask_token_id: int, special_ids: list[int]):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long),
                             persistent=False)
        self.head = MLMHead(dim, vocab_size)

    def forward(self, ctx) -> ObjectiveOutput:
        if getattr(ctx, "mlm_labels", None) is not None:  # masked in the data workers (same 80/10/10 rule)
            masked, labels = ctx.mlm_input_ids, ctx.mlm_labels
        else:
            masked, labels = mask_tokens(ctx.input_ids, ctx.attention_mask, self.special_ids, self.mask_token_id,
                                         self.vocab_size, self.cfg.mask_prob)
        if not (labels != -100).any():  # a collator batch of empty captions: nothing to predict
            return ObjectiveOutput({"mlm": self.head(ctx.text_proj[:, :1]).float().sum() * 0.0},
                                   {"mlm_acc": torch.zeros((), device=labels.device)})
        out = ctx.fuse(ctx.encode_text(masked, ctx.attention_mask), ctx.attention_mask, ctx.image_proj,
                       image_out="none")  # only text tokens are read
        where = labels != -100
        logits = self.head(out.text[where]).float()
        target = labels[where]
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput({"mlm": loss}, {"mlm_acc": acc.detach()})
