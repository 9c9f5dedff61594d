"""RefCOCO+ weakly supervised grounding data in ALBEF's converted layout -> training pairs and evaluation items.

Files (ALBEF's data.tar.gz holds the three expression files and dets.json; the refs file is ours, see below):
  refcoco+_train.json   JSON list, one entry per expression: {"image": path relative to image_root, "text": the
                        expression, "ref_id"?: int, ...}. ALBEF's grounding_dataset reads "text" in both modes;
                        "caption" is accepted as well. Images are grouped by file name (ALBEF's img_ids keys on
                        image.split('/')[-1]): the expressions of one image are ITC positives of each other.
  refcoco+_val.json, refcoco+_test.json
                        JSON lists of {"image", "text", "ref_id"}; ALBEF's test file holds testA and testB
                        together: the split of an expression is its ref's (refs file), as ALBEF takes it from
                        refer.Refs[ref_id]["split"]. Keys beyond these (ALBEF's converted patch masks) are ignored.
  refs JSON             {"<ref_id>": {"image_id": int, "bbox": [x, y, w, h], "split": "val" | "testA" | ...}}:
                        what ALBEF's evaluation reads from the refer toolkit (refs(unc).p + instances.json), saved as
                        JSON so no pickle is ever read: image_id and split = refer.Refs[ref_id]'s, bbox =
                        refer.refToAnn[ref_id]["bbox"], the referred COCO annotation's box, COCO xywh in pixels of
                        the original image. Produce it once where the refer toolkit is installed: for every ref_id of
                        refer.getRefIds(), {str(ref_id): {"image_id", "bbox", "split"}} dumped with json.
  dets.json             ALBEF's proposals (MAttNet's detections): {"<image_id>": [[x, y, w, h, ...], ...]}, boxes in
                        original-image pixels; only the first four numbers of a row are read (ALBEF ranks det[:4]).

Junk is skipped and counted by reason (REASONS): per entry bad_entry (not a JSON object), missing_field (no
"image"; no "ref_id" in an evaluation file), bad_field (an image path or ref_id of the wrong type), empty_expression
(no usable text), missing_image (the file is not on disk); evaluation only: unknown_ref (ref_id not in the refs file),
bad_ref (its refs entry is not {"image_id", "split"}), ref_without_box (its bbox is not 4 numbers with w, h > 0),
no_proposals (its image has no usable box in dets.json), and per proposal row bad_proposal (not >= 4 numbers with
w, h > 0; the image's other rows are kept). Expressions whose split is not selected are left out, not counted. A
file that is not the layout at all raises ValueError("<path>: <what is wrong>"), one line.

Evaluation images (GroundingEvalSet) are read at data.image_size with the eval geometry `mode`: "square" resizes the
whole image to S x S (ALBEF's test transform, Resize((384, 384)): nothing is cut off, the aspect changes), "crop" is
the pretraining eval transform (shorter side to S, centre S x S crop; datasets/transforms.py), where what lies
outside the central square is never seen. train/grounding_eval.py maps the map back through the same geometry.
This module knows no model and no training code.
"""
from __future__ import annotations

import io
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from . import batch as K
from .loader import BadSample
from .retrieval import RetrievalSet, _read_json, _type_name
from .text import clean_caption, tokenize
from .transforms import TooLarge, _resize, center_crop_box, check_pixels

REASONS = ("bad_entry", "missing_field", "bad_field", "empty_expression", "missing_image", "unknown_ref", "bad_ref",
           "ref_without_box", "no_proposals", "bad_proposal")
SPLITS = ("val", "testA", "testB")          # RefCOCO+ (unc) evaluation splits
MODES = ("square", "crop")
IMAGE_SIZE = "image_size"                   # batch key: int64 (B, 2), each row's original (width, height)


@dataclass(frozen=True)
class Ref:
    image_id: str                           # as dets.json keys it (str of the COCO image id)
    split: str
    box: Optional[tuple]                    # (x, y, w, h) floats; None: no usable box


@dataclass(frozen=True)
class GroundingItem:
    image: str                              # absolute path
    text: str                               # the expression, whitespace collapsed
    ref_id: str
    image_id: str
    split: str
    box: tuple                              # ground truth (x, y, w, h), original-image pixels
    proposals: tuple                        # ((x, y, w, h), ...), original-image pixels, dets.json order


# ------------------------------------------------------------------------------------------------------ helpers
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def as_box(row) -> Optional[tuple]:
    """(x, y, w, h) floats from a list of >= 4 numbers with w, h > 0, else None."""
    if not isinstance(row, (list, tuple)) or len(row) < 4 or not all(_number(v) for v in row[:4]):
        return None
    x, y, w, h = (float(v) for v in row[:4])
    return (x, y, w, h) if w > 0 and h > 0 else None


def _id(v) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
        return None
    return str(v).strip()


def _expression(entry: dict) -> Optional[str]:
    raw = entry.get("text", entry.get("caption"))
    if not isinstance(raw, str):
        return None
    text = " ".join(raw.split())
    return text or None


def _entries(path: str):
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: not an ALBEF grounding file (expected a JSON list of {{image, text, ref_id}} "
                         f"entries, got a JSON {_type_name(data)})")
    return data


# ------------------------------------------------------------------------------------------------------ readers
def read_refs(path: str) -> dict[str, Optional[Ref]]:
    """The refs JSON -> {ref_id: Ref, or None for an entry without image_id / split (counted as bad_ref when an
    expression names it)}."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a refs file (expected a JSON object {{ref_id: {{image_id, bbox, split}}}}, "
                         f"got a JSON {_type_name(data)})")
    refs: dict[str, Optional[Ref]] = {}
    for key, v in data.items():
        image_id = _id(v.get("image_id")) if isinstance(v, dict) else None
        split = v.get("split") if isinstance(v, dict) else None
        if image_id is None or not isinstance(split, str):
            refs[str(key)] = None
            continue
        refs[str(key)] = Ref(image_id, split, as_box(v.get("bbox")))
    return refs


def read_dets(path: str) -> tuple[dict[str, list[tuple]], Counter]:
    """dets.json -> ({image_id: [usable boxes]}, Counter(bad_proposal=rows dropped))."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a detections file (expected a JSON object {{image_id: [[x, y, w, h], ...]}}, "
                         f"got a JSON {_type_name(data)})")
    dets, bad = {}, Counter()
    for key, rows in data.items():
        boxes = []
        for row in rows if isinstance(rows, list) else []:
            b = as_box(row)
            if b is None:
                bad["bad_proposal"] += 1
            else:
                boxes.append(b)
        dets[str(key)] = boxes
    return dets, bad


def _image_path(entry, root: str, skipped: Counter) -> Optional[str]:
    if not isinstance(entry, dict):
        skipped["bad_entry"] += 1
        return None
    if "image" not in entry:
        skipped["missing_field"] += 1
        return None
    img = entry["image"]
    if not isinstance(img, str) or not img.strip():
        skipped["bad_field"] += 1
        return None
    return os.path.abspath(os.path.join(root, img))


def _on_disk(path: str, exists: dict) -> bool:
    if path not in exists:
        exists[path] = os.path.isfile(path)
    return exists[path]


def read_grounding_train(paths: list[str], image_root: str) -> RetrievalSet:
    """Training expressions -> a RetrievalSet (datasets/retrieval.py: media = images in order of first appearance,
    texts grouped by image, media_ids by image file name as ALBEF's img_ids) for datasets/task_sets.RetrievalPairs.
    skipped: REASONS counts (missing_image counts expressions)."""
    skipped, exists = Counter(), {}
    order, texts_of, ids = [], {}, {}
    for path in paths:
        for e in _entries(path):
            img = _image_path(e, image_root, skipped)
            if img is None:
                continue
            text = _expression(e)
            if text is None:
                skipped["empty_expression"] += 1
                continue
            if not _on_disk(img, exists):
                skipped["missing_image"] += 1
                continue
            if img not in texts_of:
                order.append(img)
                texts_of[img] = []
            texts_of[img].append(text)
    media, texts, txt2media, media_ids = [], [], [], []
    for m, img in enumerate(order):
        media.append(img)
        media_ids.append(ids.setdefault(os.path.basename(img), len(ids)))
        for t in texts_of[img]:
            texts.append(t)
            txt2media.append(m)
    return RetrievalSet(media, "image", texts, txt2media, media_ids,
                        {r: skipped[r] for r in REASONS if skipped.get(r)})


def read_grounding_eval(paths: list[str], image_root: str, refs: dict, dets: dict,
                        splits=SPLITS) -> tuple[list[GroundingItem], dict]:
    """Evaluation expressions of the selected splits -> (items ordered by `splits`, then file order; skipped
    {reason: count}). refs: read_refs(); dets: read_dets()[0]."""
    skipped, exists = Counter(), {}
    by_split: dict[str, list[GroundingItem]] = {s: [] for s in splits}
    for path in paths:
        for e in _entries(path):
            img = _image_path(e, image_root, skipped)
            if img is None:
                continue
            if "ref_id" not in e:
                skipped["missing_field"] += 1
                continue
            ref_id = _id(e["ref_id"])
            if ref_id is None:
                skipped["bad_field"] += 1
                continue
            if ref_id not in refs:
                skipped["unknown_ref"] += 1
                continue
            ref = refs[ref_id]
            if ref is None:
                skipped["bad_ref"] += 1
                continue
            if ref.split not in by_split:
                continue   # another split: not selected, not junk
            text = _expression(e)
            if text is None:
                skipped["empty_expression"] += 1
                continue
            if ref.box is None:
                skipped["ref_without_box"] += 1
                continue
            if not _on_disk(img, exists):
                skipped["missing_image"] += 1
                continue
            props = dets.get(ref.image_id) or []
            if not props:
                skipped["no_proposals"] += 1
                continue
            by_split[ref.split].append(GroundingItem(img, text, ref_id, ref.image_id, ref.split, ref.box,
                                                     tuple(props)))
    items = [it for s in splits for it in by_split[s]]
    return items, {r: skipped[r] for r in REASONS if skipped.get(r)}


# ------------------------------------------------------------------------------------------------------ images
def read_eval_image(path: str, size: int, mode: str, max_pixels: Optional[int] = None):
    """An image file -> (uint8 (1, 3, S, S), (width, height) of the original), read with the eval geometry `mode`
    (module docstring); BadSample("missing_image" / "oversize_image" / "bad_image")."""
    from PIL import Image

    if mode not in MODES:
        raise ValueError(f"eval geometry must be one of {MODES}, got {mode!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise BadSample("missing_image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            check_pixels(w, h, max_pixels)
            im = im.convert("RGB")
            a = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    except (TooLarge, Image.DecompressionBombError):
        raise BadSample("oversize_image") from None
    except Exception as exn:  # noqa: BLE001 - any decode failure makes the sample bad, not the run
        raise BadSample("bad_image") from exn
    if mode == "crop":
        top, left, ch, cw = center_crop_box(h, w)
        a = a[top:top + ch, left:left + cw]
    return _resize(a.permute(2, 0, 1)[None], size, "bicubic").contiguous(), (w, h)


class GroundingEvalSet:
    """Evaluation items for datasets/task_loader.eval_batches: pixels in the eval geometry, the tokenized
    expression, and IMAGE_SIZE (each row's original width, height) for mapping the map back."""

    def __init__(self, items: list[GroundingItem], cfg, tokenizer, mode: str = "square"):
        if mode not in MODES:
            raise ValueError(f"eval geometry must be one of {MODES}, got {mode!r}")
        self.items, self.cfg, self.tokenizer, self.mode = items, cfg, tokenizer, mode

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, rng: Optional[random.Random]) -> dict:
        item = self.items[i]
        px, size = read_eval_image(item.image, self.cfg.image_size, self.mode, self.cfg.max_image_pixels)
        return {"px": px, "text": clean_caption(item.text), "size": size}

    def collate(self, samples: list[dict]) -> dict:
        return {K.PIXEL_VALUES: torch.stack([s["px"] for s in samples]), K.NORMALIZE: self.cfg.normalize,
                K.MODALITY: "image",
                **tokenize(self.tokenizer, [s["text"] for s in samples], self.cfg.max_text_len),
                IMAGE_SIZE: torch.tensor([s["size"] for s in samples], dtype=torch.long)}
