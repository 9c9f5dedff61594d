"""Caption cleaning and batch tokenisation (the tokenizer is passed in; this package knows no model)."""
from __future__ import annotations

import re

import torch

from .batch import ATTENTION_MASK, INPUT_IDS

_WS = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Light cleaning only: strip and collapse whitespace. Casing/punctuation are the tokenizer's business."""
    return _WS.sub(" ", text).strip()


def tokenize(tokenizer, captions: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {INPUT_IDS: enc["input_ids"].long(), ATTENTION_MASK: enc["attention_mask"].long()}
