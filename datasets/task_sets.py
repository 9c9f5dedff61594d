"""Map-style task datasets for datasets/task_loader.py: annotation records -> samples -> batches.

  RetrievalPairs   one sample per caption: its media, the caption, the media's id (ITC positives, ITM negatives)
  MediaSet         every media of a retrieval set once (evaluation embeds them all)
  VqaSet           a question, its image, the soft answer targets over the answer vocabulary
Records come from the annotation readers (datasets/retrieval.py, datasets/vqa.py); media are read by MediaReader.
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


def _pixels(samples: list[dict], cfg: DataConfig, modality: str) -> dict:
    return {K.PIXEL_VALUES: torch.stack([s["px"] for s in samples]), K.NORMALIZE: cfg.normalize,
            K.MODALITY: modality}


class RetrievalPairs:
    def __init__(self, rset, cfg: DataConfig, tokenizer, train: bool = True):
        self.rset, self.cfg, self.tokenizer = rset, cfg, tokenizer
        self.read = MediaReader(cfg, train, getattr(rset, "shard_index", None))

    def __len__(self) -> int:
        return len(self.rset.texts)

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        caption = clean_caption(self.rset.texts[i])
        if not caption:
            raise BadSample("empty_caption")
        m = self.rset.txt2media[i]
        return {"px": self.read(self.rset.media[m], self.rset.modality, rng), "caption": caption, "media": m}

    def collate(self, samples: list[dict]) -> dict:
        return {**_pixels(samples, self.cfg, self.rset.modality),
                **tokenize(self.tokenizer, [s["caption"] for s in samples], self.cfg.max_text_len),
                K.IMAGE_IDS: torch.tensor([s["media"] for s in samples], dtype=torch.long)}


class MediaSet:
    def __init__(self, rset, cfg: DataConfig):
        self.rset, self.cfg = rset, cfg
        self.read = MediaReader(cfg, train=False, shard_index=getattr(rset, "shard_index", None))

    def __len__(self) -> int:
        return len(self.rset.media)

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        return {"px": self.read(self.rset.media[i], self.rset.modality, None)}

    def collate(self, samples: list[dict]) -> dict:
        return _pixels(samples, self.cfg, self.rset.modality)


def tokenize_texts(texts: list[str], tokenizer, max_len: int) -> dict:
    """Every caption of a retrieval set, cleaned and tokenized at once: {input_ids, attention_mask} (T, L)."""
    return tokenize(tokenizer, [clean_caption(t) for t in texts], max_len)


class VqaSet:
    """items: datasets/vqa.py records; vocab: the answer list (index = class). Targets: ViLT soft scores."""

    def __init__(self, items: list, vocab: list[str], cfg: DataConfig, tokenizer, train: bool):
        from .vqa import soft_targets

        self.items, self.vocab, self.cfg, self.tokenizer = items, vocab, cfg, tokenizer
        self.index = {a: i for i, a in enumerate(vocab)}
        self.soft_targets = soft_targets
        self.read = MediaReader(cfg, train)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        item = self.items[i]
        question = clean_caption(item.question)
        if not question:
            raise BadSample("empty_question")
        return {"px": self.read(item.image, "image", rng), "question": question,
                "targets": self.soft_targets(item.answers, self.index), "question_id": item.question_id}

    def collate(self, samples: list[dict]) -> dict:
        targets = torch.zeros(len(samples), len(self.vocab))
        for row, s in enumerate(samples):
            for j, score in s["targets"].items():
                targets[row, j] = score
        return {**_pixels(samples, self.cfg, "image"),
                **tokenize(self.tokenizer, [s["question"] for s in samples], self.cfg.max_text_len),
                "vqa_targets": targets,
                "question_id": torch.tensor([s["question_id"] for s in samples], dtype=torch.long)}
