"""Masked language modelling conditioned on the image (MLM).

BERT masking (models/masking.py `bert_mask`, the one rule): each real, non-special token is selected with probability
mask_prob; of those 80% become the mask token, 10% a random non-special token, 10% stay. The logits are computed only
at selected positions (the vocabulary projection is the costliest part of the head).
With `data.mlm_probability` set, the data workers apply the same function and the batch carries `mlm_input_ids` and
`mlm_labels`; the objective then uses those instead of masking on the device.
`masking: official` is the released SCL code's rule instead (`official_mlm_mask`: transformers 4.6's whole-word
collator on padded captions; with RoBERTa it masks single tokens, about 16% of them, and draws replacements from the
whole vocabulary). It loops over rows on the CPU: pair it with `data.mlm_probability` so the data workers do it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.heads import MLMHead
from models.masking import bert_mask, official_mlm_mask
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import ImageEncoding, TextEncoding


@dataclass
class MlmConfig:
    weight: float = 1.0
    mask_prob: float = 0.15
    masking: Literal["bert", "official"] = "bert"   # see the module docstring

    def validate(self) -> None:
        check_weight("objectives.mlm.weight", self.weight)
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"objectives.mlm.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.masking not in ("bert", "official"):
            raise ValueError(f"objectives.mlm.masking: expected 'bert' or 'official', got {self.masking!r}")


def build_masker(cfg: MlmConfig, tokenizer):
    """`masker(input_ids, attention_mask, generator=None) -> (masked ids, labels)` for cfg's rule: the one function
    the data workers (data.mlm_probability) and the objective on the device both call."""
    special = torch.tensor(sorted({int(i) for i in tokenizer.all_special_ids}), dtype=torch.long)
    if cfg.masking == "official":
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return functools.partial(
            official_mlm_mask, continuation=torch.tensor([t.startswith("##") for t in tokens]),
            skipped=torch.tensor([t in ("[CLS]", "[SEP]") for t in tokens]), special_ids=special,
            mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), probability=cfg.mask_prob)
    return functools.partial(bert_mask, special_ids=special, mask_token_id=tokenizer.mask_token_id,
                             vocab_size=len(tokenizer), probability=cfg.mask_prob)


class MLM(Objective):
    name, Config = "mlm", MlmConfig
    reads = (ImageEncoding, TextEncoding)
    batch_keys = ("mlm_input_ids", "mlm_labels")

    def __init__(self, cfg: MlmConfig, env: BuildEnv):
        super().__init__(cfg, env)
        self.masker = build_masker(cfg, env.tokenizer)
        self.mask_token_id = env.tokenizer.mask_token_id
        self.head = MLMHead(env.backbone.hidden_size, env.backbone.text.vocab_size)

    @classmethod
    def check_run(cls, cfg, run) -> None:
        p = run.data.mlm_probability
        if p is not None and abs(cfg.mask_prob - p) > 1e-9:
            raise ValueError(f"data.mlm_probability={p} disagrees with objectives.mlm.mask_prob={cfg.mask_prob}; "
                             "the collator masks instead of the model, so they must match")

    def forward(self, ctx) -> ObjectiveOutput:
        if ctx.mlm_labels is not None:  # masked in the data workers (the same rule)
            masked, labels = ctx.mlm_input_ids, ctx.mlm_labels
        else:
            masked, labels = self.masker(ctx.input_ids, ctx.attention_mask)
        where = labels != -100
        scale = 1.0
        if not where.any():
            # Nothing selected (e.g. a batch of empty captions): the same passes on a zero-weight stand-in target
            # (each caption's first token). Skipping them would hang ZeRO-3, where every rank must run the same
            # modules in the same order.
            where = torch.zeros_like(where)
            where[:, 0] = True
            labels = ctx.input_ids.masked_fill(~where, -100)
            scale = 0.0
        out = ctx.model.fuse(ctx.model.fusion_text(masked, ctx.attention_mask), ctx.attention_mask, ctx.image,
                             image_out="none")  # only text tokens are read
        logits = self.head(out.text[where]).float()
        target = labels[where]
        loss = F.cross_entropy(logits, target) * scale
        acc = (logits.argmax(-1) == target).float().mean() * scale
        return ObjectiveOutput({"mlm": loss}, {"mlm_acc": acc.detach()})
