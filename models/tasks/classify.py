"""Classification heads on the fusion's pooled features, trained with cross-entropy (SNLI-VE; NLVR2 builds on it).

    classifier   SCL / ViLT's task MLP: Linear(in, 2h) -> LayerNorm -> GELU -> Linear(2h, classes), BERT init
                 (N(0, 0.02) weights, zero biases; SCL's objectives.init_weights)
    logits       ImageTextClassifier: [pooled text CLS ; pooled image CLS] (2h) of one fusion pass -> classifier
    loss         "<name>": cross-entropy against batch["labels"] (B,) int64, the mean over the batch
    stats        "<name>_acc": the batch's accuracy (argmax)

Build as TaskModel(cfg with heads=[], ImageTextClassifier(pooled_dim(cfg), 3, "snli_ve")).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.init import init_bert_style
from models.objectives.base import ObjectiveOutput

LABELS = "labels"


def mlp_classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Linear(in_dim, hidden) -> LayerNorm -> GELU -> Linear(hidden, num_classes), BERT-style init."""
    m = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes))
    init_bert_style(m)
    return m


class ClassifierHead(nn.Module):
    """Cross-entropy over `logits(backbone, batch)`; subclasses say how the logits come about."""

    def __init__(self, num_classes: int, name: str):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 2, got {num_classes}")
        self.num_classes, self.name = num_classes, name

    def logits(self, backbone, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, backbone, batch: dict) -> ObjectiveOutput:
        logits = self.logits(backbone, batch).float()
        labels = batch[LABELS]
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"batch[{LABELS!r}] has shape {tuple(labels.shape)}, expected ({logits.shape[0]},)")
        loss = F.cross_entropy(logits, labels.long())
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return ObjectiveOutput({self.name: loss}, {f"{self.name}_acc": acc})


class ImageTextClassifier(ClassifierHead):
    """One image, one text: the MLP on the pooled fusion features (in_dim -> in_dim -> num_classes; in_dim = 2h for
    the co-attention fusion's [text CLS; image CLS])."""

    def __init__(self, in_dim: int, num_classes: int, name: str):
        super().__init__(num_classes, name)
        if in_dim < 1:
            raise ValueError(f"{type(self).__name__}: in_dim must be >= 1, got {in_dim}")
        self.classifier = mlp_classifier(in_dim, in_dim, num_classes)

    def logits(self, backbone, batch: dict) -> torch.Tensor:
        """(B, num_classes). The classifier is called as a module, so ZeRO-3 gathers its weights here too."""
        image = backbone.encode_image(batch["pixel_values"])
        text = backbone.fusion_text(batch["input_ids"], batch["attention_mask"])
        fused = backbone.fuse(text, batch["attention_mask"], image, text_out="cls", image_out="cls")
        return self.classifier(fused.cls_feats)
