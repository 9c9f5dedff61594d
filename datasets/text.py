"""Caption cleaning and batch tokenisation (the tokenizer is passed in; this package knows no model)."""
from __future__ import annotations

import re

import torch

_WS = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Light cleaning only: strip and collapse whitespace. Casing/punctuation are the tokenizer's business."""
    return _WS.sub(" ", text).strip()


def tokenize(tokenizer, captions: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def special_token_info(tokenizer) -> dict:
    """What MLM masking needs from the tokenizer: [MASK] id, vocab size, ids never to mask or draw."""
    if tokenizer.mask_token_id is None:
        raise ValueError("data.mlm_probability is set but the tokenizer has no mask token")
    return {"mask_id": int(tokenizer.mask_token_id), "vocab_size": len(tokenizer),
            "special_ids": sorted({int(i) for i in tokenizer.all_special_ids})}


def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, info: dict, probability: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is picked with `probability`; picked tokens become [MASK]
    (80%), a random non-special token (10%) or stay (10%). Labels are -100 where not picked."""
    special = torch.tensor(info["special_ids"], dtype=input_ids.dtype)
    can = attention_mask.bool() & ~torch.isin(input_ids, special)
    picked = (torch.rand(input_ids.shape, generator=gen) < probability) & can
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape, generator=gen)
    ids = input_ids.clone()
    ids[picked & (u < 0.8)] = info["mask_id"]
    rand_pos = picked & (u >= 0.8) & (u < 0.9)
    pool = torch.ones(info["vocab_size"], dtype=torch.bool)
    pool[special[special < info["vocab_size"]]] = False
    pool = pool.nonzero().squeeze(1)
    ids[rand_pos] = pool[torch.randint(len(pool), (int(rand_pos.sum()),), generator=gen)]
    return ids, labels
