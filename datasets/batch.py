"""The batch contract: every key a loader hands to the trainer, spelled once, and the move to the device.

A batch is a dict. The loaders build it with the constants below, the engine moves it with `to_device`, the model
and the eval hook read it by these names. CONTRACT says, per key, its dtype, who produces it and what it means.
Producers: "train" (datasets.loader's train loader, every batch), "eval" (its eval loader, every batch),
"text_masker" (train batches, only when build_train_loader got a text_masker, i.e. data.mlm_probability is set),
"tokenizer_view" (train batches, only when data.tokenizer_view is set),
"engine" (added by the training engine to the train batch it is about to run), "task" / "task_eval" (the
fine-tuning loaders' train / eval batches, datasets/task_loader.py; a task adds its own keys, e.g. VQA's targets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .transforms import normalize_pixels

PIXEL_VALUES = "pixel_values"
NORMALIZE = "normalize"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
MLM_INPUT_IDS = "mlm_input_ids"
MLM_LABELS = "mlm_labels"
TOKENIZER_PIXELS = "tokenizer_pixels"
MODALITY = "modality"
SOURCE = "source"
SAMPLE_KEYS = "__key__"
CAPTION = "caption"
IMAGE_IDS = "image_ids"
INDEX = "index"
VALID = "valid"

STEP = "step"

TRAIN, EVAL, TEXT_MASKER, ENGINE = "train", "eval", "text_masker", "engine"
TOKENIZER_VIEW = "tokenizer_view"
TASK, TASK_EVAL = "task", "task_eval"   # fine-tuning loaders (datasets/task_loader.py, datasets/task_sets.py)


@dataclass(frozen=True)
class Key:
    name: str
    dtype: str
    producers: tuple[str, ...]
    meaning: str


CONTRACT: dict[str, Key] = {k.name: k for k in (
    Key(PIXEL_VALUES, "uint8 (B, F, 3, H, W)", (TRAIN, EVAL),
        "frames (F = 1 for images); normalised on the device by to_device"),
    Key(NORMALIZE, "str", (TRAIN, EVAL), "which mean/std (datasets.transforms.MEAN_STD) normalises pixel_values"),
    Key(INPUT_IDS, "int64 (B, L)", (TRAIN, EVAL), "caption token ids, padded to data.max_text_len"),
    Key(ATTENTION_MASK, "int64 (B, L)", (TRAIN, EVAL), "1 = real token, 0 = padding"),
    Key(MLM_INPUT_IDS, "int64 (B, L)", (TEXT_MASKER,), "input_ids after BERT masking in the data worker"),
    Key(MLM_LABELS, "int64 (B, L)", (TEXT_MASKER,), "original id where masked, -100 elsewhere"),
    Key(TOKENIZER_PIXELS, "uint8 (B, 3, s, s)", (TOKENIZER_VIEW,),
        "the dVAE tokenizer's view of each image (s = data.tokenizer_view.size), not mean/std-normalised; "
        "float32 in [0, 1] after to_device"),
    Key(MODALITY, "str", (TRAIN, EVAL), '"image" | "video"; a batch is single-modality'),
    Key(SOURCE, "int", (EVAL,), "index into data.eval; an eval batch is single-source"),
    Key(SAMPLE_KEYS, "list[str] (B)", (TRAIN, EVAL), "sample keys (webdataset __key__)"),
    Key(CAPTION, "list[str] (B)", (EVAL,), "cleaned caption strings (the retrieval ground truth)"),
    Key(IMAGE_IDS, "int64 (B)", (TASK,), "retrieval fine-tuning: the sample's image; equal ids are ITC positives "
        "and never ITM negatives"),
    Key(INDEX, "int64 (B)", (TASK, TASK_EVAL), "positions of the rows in the task dataset (-1: padding)"),
    Key(VALID, "bool (B)", (TASK_EVAL,), "False: a padding or bad-sample row whose outputs are ignored"),
    Key(STEP, "int", (ENGINE,), "engine.step when the batch's optimizer step runs (0 for the first): schedules "
        "inside objectives (ITA's alpha warmup)"),
)}


def keys_of(*producers: str) -> frozenset[str]:
    """The keys a batch from these producers carries, e.g. keys_of("train", "text_masker")."""
    return frozenset(k.name for k in CONTRACT.values() if set(k.producers) & set(producers))


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Tensors to `device` (non_blocking); uint8 pixel_values normalised there as batch["normalize"] says
    (default "clip") into `dtype`; tokenizer_pixels to float32 in [0, 1] whatever `dtype` (the dVAE's codes are an
    argmax: bf16 pixels could flip them); other floating tensors cast to `dtype`; integer tensors keep theirs;
    anything that is not a tensor is passed through as is."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if k == PIXEL_VALUES and v.dtype == torch.uint8:
                v = normalize_pixels(v, batch.get(NORMALIZE, "clip"), dtype)
            elif k == TOKENIZER_PIXELS:
                v = v.float() / 255 if v.dtype == torch.uint8 else v.float()
            elif v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        out[k] = v
    return out
