"""Map-style task datasets for the classification tasks (datasets/task_loader.py protocol: len, load, collate).

  Nlvr2Set    a sentence, the pair's two images, the True/False label (datasets/nlvr2.py records)
  SnliVeSet   a hypothesis, its image premise, the 3-way label (datasets/snli_ve.py records)

Batch keys (beside datasets/batch.py's input_ids / attention_mask / normalize / modality / index / valid):
  pixel_values  uint8 (B, F, 3, H, W); NLVR2: (B, 2, F, 3, H, W), [left, right] (normalised on the device as any
                pixel_values: to_device works on the last three dimensions)
  labels        int64 (B,) the class index
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from . import batch as K
from .config import DataConfig
from .loader import BadSample
from .task_loader import MediaReader
from .text import clean_caption, tokenize

LABELS = "labels"


class _ClassSet:
    text_attr = ""

    def __init__(self, items: list, cfg: DataConfig, tokenizer, train: bool):
        self.items, self.cfg, self.tokenizer = items, cfg, tokenizer
        self.read = MediaReader(cfg, train)

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def _text(self, item) -> str:
        text = clean_caption(getattr(item, self.text_attr))
        if not text:
            raise BadSample("empty_sentence")
        return text

    def _collate(self, samples: list[dict], px: torch.Tensor) -> dict:
        return {K.PIXEL_VALUES: px, K.NORMALIZE: self.cfg.normalize, K.MODALITY: "image",
                **tokenize(self.tokenizer, [s["text"] for s in samples], self.cfg.max_text_len),
                LABELS: torch.tensor([s["label"] for s in samples], dtype=torch.long)}


class Nlvr2Set(_ClassSet):
    text_attr = "sentence"

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        item = self.items[i]
        text = self._text(item)
        # the two images get their own augmentation draws (SCL transforms each image separately)
        return {"text": text, "label": item.label,
                "px": torch.stack([self.read(item.left, "image", rng), self.read(item.right, "image", rng)])}

    def collate(self, samples: list[dict]) -> dict:
        return self._collate(samples, torch.stack([s["px"] for s in samples]))


class SnliVeSet(_ClassSet):
    text_attr = "hypothesis"

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        item = self.items[i]
        text = self._text(item)
        return {"text": text, "label": item.label, "px": self.read(item.image, "image", rng)}

    def collate(self, samples: list[dict]) -> dict:
        return self._collate(samples, torch.stack([s["px"] for s in samples]))
