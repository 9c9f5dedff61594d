"""A fine-tuning model = the backbone (models/backbone.py) + one task head; no pretraining objective is built.

A task head is an nn.Module whose `forward(backbone, batch) -> ObjectiveOutput` computes the task's named losses
(and logged stats) from the backbone's `encode_image` / `encode_text` / `fuse` / `embed_*`. Its weights load strictly
from `convert_checkpoint.py to-finetune` output: the backbone keys come from the file, the head's from its own init
(the file's pretraining-only keys are already gone).
"""
from __future__ import annotations

import torch.nn as nn

from models.backbone import HEADS, ModelConfig, VLPBackbone


class TaskModel(VLPBackbone):
    def __init__(self, cfg: ModelConfig, head: nn.Module):
        super().__init__(cfg, HEADS if cfg.heads is None else cfg.heads)
        self.head = head

    def forward(self, batch: dict) -> dict:
        out = self.head(self, batch)
        return {"loss": sum(out.losses.values()), "losses": out.losses, "stats": out.stats}

    def no_weight_decay(self) -> set[str]:
        extra = getattr(self.head, "no_weight_decay", lambda: set())()
        return super().no_weight_decay() | {f"head.{n}" for n in extra}
