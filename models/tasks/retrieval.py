"""Retrieval fine-tuning with the rank head of the released SCL code (ViLT's `irtr` task), as the objective "rank".

    objectives: {rank: {weight: 1.0, num_negatives: 15}, itm: {weight: 0.5}, itc: {weight: 0.5}}   # SCL's mix

`rank_output` = Linear(2 * hidden, 1) on the fusion's pooled [text CLS; image CLS] features, initialised from the
positive-class row of the backbone's ITM head (weight row 1, bias[1]); with `freeze_itm` (default, as released) the
ITM head itself gets requires_grad False. Loss: for every sample of the micro batch, its image is scored with its
own text and `num_negatives` other texts through the fusion encoder and rank_output; cross-entropy with the positive
at index 0 (softmax over the 1 + n candidates).

Differences from the released code:
  * negatives: the released code draws `draw_false_text` random captions of the whole dataset per sample; we draw
    them without replacement from the other texts of the micro batch, skipping texts identical to the sample's own
    caption (same token ids) and, when the batch names each sample's image (`image_ids`, fine-tuning loaders), the
    other captions of the same image. A micro batch with fewer such texts than num_negatives gives what it has: n =
    min(num_negatives, B - 1) slots per sample, and a sample with fewer allowed texts (duplicate captions) has its
    empty slots masked out of the softmax (-inf). A sample with no negative at all contributes loss 0.
  * initialisation: the released code makes rank_output's parameters views of the ITM head's row (shared storage);
    ours are copies. The copy is made at build time, and again from the loaded ITM head after a fine-tuning init
    that has no rank head (train/finetune.py load_init calls `init_from_backbone`); `rank_keys_from_itm(state_dict)`
    does the same for a state dict before a strict load.
  * the released `irtr` task also computes its contrastive loss on the same pass; here that is the separate "itc"
    objective (enable it beside "rank").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbone import ImageTokens
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import ImageEncoding, TextEncoding

RANK_PREFIX = "objectives.rank.rank_output."


@dataclass
class RankConfig:
    weight: float = 1.0
    num_negatives: int = 15   # the released fine-tuning configs' draw_false_text
    freeze_itm: bool = True   # as released: the ITM head does not train while the rank head does

    def validate(self) -> None:
        check_weight("objectives.rank.weight", self.weight)
        if isinstance(self.num_negatives, bool) or not isinstance(self.num_negatives, int) or self.num_negatives < 1:
            raise ValueError(f"objectives.rank.num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if not isinstance(self.freeze_itm, bool):
            raise ValueError(f"objectives.rank.freeze_itm must be true or false, got {self.freeze_itm!r}")


def draw_negatives(same: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, n), valid (B, n)): per row, n distinct columns drawn uniformly without replacement among those
    not `same` (B, B bool, diagonal included); valid is False for the slots a row had no allowed column for."""
    keys = torch.rand(same.shape, device=same.device).masked_fill(same, float("inf"))
    sorted_keys, order = keys.sort(dim=1)
    return order[:, :n], torch.isfinite(sorted_keys[:, :n])


class Rank(Objective):
    name, Config = "rank", RankConfig
    reads = (ImageEncoding, TextEncoding)
    heads = ("itm",)          # rank_output starts from the ITM head's positive row
    pretrain_only = False     # a fine-tuning objective: to-finetune keeps it

    def __init__(self, cfg: RankConfig, env: BuildEnv):
        super().__init__(cfg, env)
        itm = env.backbone.itm_head
        self.rank_output = nn.Linear(itm.in_features, 1)
        self.copy_from_itm(itm)
        if cfg.freeze_itm:
            itm.requires_grad_(False)

    @torch.no_grad()
    def copy_from_itm(self, itm_head: nn.Linear) -> None:
        """rank_output := the ITM head's positive-class row (weight row 1, bias[1]), copied."""
        self.rank_output.weight.copy_(itm_head.weight[1:2])
        self.rank_output.bias.copy_(itm_head.bias[1:2])

    def init_from_backbone(self, model) -> None:
        """After a fine-tuning init without a rank head (train/finetune.py load_init): start it from the loaded ITM
        head, as the official code does after loading the pretrained weights."""
        self.copy_from_itm(model.itm_head)

    @classmethod
    def check_run(cls, cfg, run) -> None:
        if run.train.micro_batch_size < 2:
            raise ValueError(f"train.micro_batch_size: objectives.rank draws its negatives within a micro batch, so "
                             f"it needs at least 2 samples, got {run.train.micro_batch_size}")

    def score(self, model, text: torch.Tensor, text_mask: torch.Tensor, image: ImageTokens) -> torch.Tensor:
        """(n,) rank scores of (text, image) pairs."""
        out = model.fuse(text, text_mask, image, text_out="cls", image_out="cls")
        return self.rank_output(out.cls_feats).squeeze(-1)

    def forward(self, ctx) -> ObjectiveOutput:
        ids = ctx.input_ids
        b = ids.shape[0]
        n = min(self.cfg.num_negatives, b - 1)
        with torch.no_grad():
            same = (ids[:, None, :] == ids[None, :, :]).all(-1)   # identical captions, the diagonal included
            image_ids = getattr(ctx, "image_ids", None)
            if image_ids is not None:   # another caption of the same image is no negative either
                image_ids = image_ids.to(ids.device)
                same |= image_ids[:, None] == image_ids[None, :]
            neg, valid = draw_negatives(same, n)
        rows = torch.arange(b, device=ids.device)
        text_idx = torch.cat([rows, neg[valid]])
        image_idx = torch.cat([rows, rows[:, None].expand(b, n)[valid]])
        image = ctx.image
        s = self.score(ctx.model, ctx.fusion_text[text_idx], ctx.attention_mask[text_idx],
                       ImageTokens(image.tokens[image_idx], image.num_frames)).float()
        negatives = s.new_full((b, n), float("-inf"))
        negatives[valid] = s[b:]
        scores = torch.cat([s[:b, None], negatives], dim=1)   # (B, 1 + n), the positive first
        target = torch.zeros(b, dtype=torch.long, device=scores.device)
        loss = F.cross_entropy(scores, target)
        acc = (scores.argmax(1) == 0).float().mean()
        return ObjectiveOutput({"rank": loss}, {"rank_acc": acc.detach()})


def rank_pair_score(model, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: ImageTokens) -> torch.Tensor:
    """(n,) the rank head's score of each pair: a `pair_score` for train/retrieval_eval.py's re-ranking."""
    return model.objectives["rank"].score(model, text, text_mask, image_tokens)


def rank_keys_from_itm(state_dict: dict, prefix: str = "") -> list[str]:
    """Fill the rank head's keys a state dict lacks from its ITM head (in place), as a fresh build initialises them;
    -> the keys added. For loading a pretraining or to-finetune file into a model with the rank objective."""
    added = []
    for field in ("weight", "bias"):
        key, src = f"{prefix}{RANK_PREFIX}{field}", f"{prefix}itm_head.{field}"
        if key not in state_dict and src in state_dict:
            state_dict[key] = state_dict[src][1:2].clone()
            added.append(key)
    return added


# The registry entry. models/objectives/__init__.py imports this module after building OBJECTIVES, and this module
# imports that package (for Objective): whichever of the two is imported first, the entry is made here, once Rank
# exists (a `from ... import Rank` in the registry would fail when this module is the one imported first).
from models.objectives import OBJECTIVES  # noqa: E402

OBJECTIVES.setdefault(Rank.name, Rank)
