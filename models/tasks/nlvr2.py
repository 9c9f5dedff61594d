"""NLVR2 head: SCL / ViLT's two-pass classifier (scl_module.py nlvr2_classifier, objectives.py compute_nlvr2).

    passes   both images through the vision tower in one call (stacked along the batch), then two fusion passes
             with the same text tokens (the text tower runs once; SCL's `infer` runs it per pass, the same up to
             dropout): the left image with modality type 1, the right one with type 2 (the model
             needs model.fusion.num_token_types >= 3; the third row starts as a copy of the image row, see
             train/finetune.py load_init)
    logits   [pass 1 cls_feats ; pass 2 cls_feats] (4h) -> Linear(4h, 2h) -> LayerNorm -> GELU -> Linear(2h, 2)
             (class 1 = True), BERT init
    loss     "nlvr2": cross-entropy; stats "nlvr2_acc"

Batch: pixel_values (B, 2, F, 3, H, W) [left, right] (datasets/task_sets_pairs.py), input_ids, attention_mask,
labels (B,) int64.
"""
from __future__ import annotations

import torch

from models.backbone import ImageTokens
from models.tasks.classify import ClassifierHead, mlp_classifier

LEFT_TYPE, RIGHT_TYPE = 1, 2


class Nlvr2Head(ClassifierHead):
    def __init__(self, hidden: int, name: str = "nlvr2"):
        super().__init__(2, name)
        if hidden < 1:
            raise ValueError(f"Nlvr2Head: hidden must be >= 1, got {hidden}")
        self.classifier = mlp_classifier(4 * hidden, 2 * hidden, 2)

    def logits(self, backbone, batch: dict) -> torch.Tensor:
        px = batch["pixel_values"]
        if px.dim() != 6 or px.shape[1] != 2:
            raise ValueError(f"NLVR2 pixel_values must be (B, 2, F, 3, H, W) [left, right], got {tuple(px.shape)}")
        b = px.shape[0]
        image = backbone.encode_image(torch.cat([px[:, 0], px[:, 1]]))   # one vision call for both images
        left = ImageTokens(image.tokens[:b], image.num_frames)
        right = ImageTokens(image.tokens[b:], image.num_frames)
        mask = batch["attention_mask"]
        text = backbone.encode_text(batch["input_ids"], mask)
        one = backbone.fuse(text, mask, left, image_token_type=LEFT_TYPE, text_out="cls", image_out="cls")
        two = backbone.fuse(text, mask, right, image_token_type=RIGHT_TYPE, text_out="cls", image_out="cls")
        return self.classifier(torch.cat([one.cls_feats, two.cls_feats], dim=-1))
