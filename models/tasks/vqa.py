"""VQAv2 head: ViLT / METER / SCL's answer classifier on the fusion's pooled features, trained with soft targets.

    logits   pooled fusion features (in_dim: [text CLS ; image CLS] = 2 x hidden, or the single-stream multimodal
             CLS) -> Linear(in_dim, in_dim) -> LayerNorm -> GELU -> Linear (answers)
    loss     "vqa": BCE-with-logits against the soft scores (datasets/vqa.py soft_targets), averaged over every
             (question, answer) entry and multiplied by the number of answers (ViLT's, after BAN), i.e. summed
             over answers and averaged over questions
    stats    "vqa_train_score": mean over the batch of the soft score of the argmax answer (ViLT's VQAScore)

Batch keys: pixel_values, input_ids, attention_mask (datasets/batch.py) and "vqa_targets" (B, num_answers) float.
The backbone needs no head of its own: build it as TaskModel(cfg with heads=[], VqaHead(pooled_dim(cfg), num_answers)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.init import init_bert_style
from models.objectives.base import ObjectiveOutput

VQA_TARGETS = "vqa_targets"


class VqaHead(nn.Module):
    def __init__(self, in_dim: int, num_answers: int):
        super().__init__()
        if in_dim < 1 or num_answers < 1:
            raise ValueError(f"VqaHead: in_dim and num_answers must be >= 1, got {in_dim}, {num_answers}")
        self.num_answers = num_answers
        d = in_dim
        self.classifier = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, num_answers))
        init_bert_style(self.classifier)

    def logits(self, backbone, batch: dict) -> torch.Tensor:
        """(B, num_answers). The classifier is called as a module, so ZeRO-3 gathers its weights here too."""
        image = backbone.encode_image(batch["pixel_values"])
        text = backbone.fusion_text(batch["input_ids"], batch["attention_mask"])
        fused = backbone.fuse(text, batch["attention_mask"], image, text_out="cls", image_out="cls")
        return self.classifier(fused.cls_feats)

    def forward(self, backbone, batch: dict) -> ObjectiveOutput:
        logits = self.logits(backbone, batch).float()
        targets = batch[VQA_TARGETS].float()
        if targets.shape != logits.shape:
            raise ValueError(f"batch[{VQA_TARGETS!r}] has shape {tuple(targets.shape)}, expected "
                             f"{tuple(logits.shape)} (batch, num_answers)")
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        with torch.no_grad():
            score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        return ObjectiveOutput({"vqa": loss}, {"vqa_train_score": score})
