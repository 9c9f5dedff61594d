"""SNLI-VE data (necla-ml/SNLI-VE): the JSON-lines annotations over Flickr30k images.

Annotations: snli_ve_{train,dev,test}.jsonl, written by the release's snli_ve_generator.py: SNLI's lines (keys sorted)
plus the image id, one JSON object a line:
    Flickr30K_ID   the Flickr30k image id, e.g. "3416050480" (vet/tools/snli_ve_generator.py; the first release's
                   generator wrote `Flikr30kID`: "3416050480.jpg", also read)
    sentence2      the hypothesis (sentence1, the SNLI premise, is a caption of the image and is not used)
    gold_label     "entailment" / "neutral" / "contradiction" ("-", no annotator majority, is filtered out by the
                   release; counted as "no_gold_label" if present)
    pairID, captionID, annotator_labels, sentence{1,2}_{binary_,}parse
Images: image_root/<Flickr30K_ID>.jpg (Flickr30k's flickr30k-images/). Reader-level junk is counted by reason
(SKIP_REASONS); a file that is not this layout is one ValueError naming it.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from .jsonl import check_layout, read_jsonl

LABELS = ("entailment", "neutral", "contradiction")   # class index = position
ID_KEYS = ("Flickr30K_ID", "Flikr30kID")
SKIP_REASONS = ("bad_line", "bad_entry", "missing_field", "bad_image_id", "no_gold_label", "bad_label",
                "bad_sentence", "empty_sentence")
_IMAGE_ID = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class SnliVeItem:
    pair_id: str        # pairID ("" when absent)
    image: str          # image path
    hypothesis: str
    label: int          # index into LABELS


def image_id(record: dict) -> str | None:
    for key in ID_KEYS:
        if key in record:
            v = record[key]
            if isinstance(v, int) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str):
                return None
            v = v[: -len(".jpg")] if v.endswith(".jpg") else v
            return v if _IMAGE_ID.match(v) else None
    return None


def read_snli_ve(path: str, image_root: str) -> tuple[list[SnliVeItem], dict[str, int]]:
    """Items in file order and the skipped lines counted by reason."""
    skipped: Counter = Counter()
    records = read_jsonl(path, "SNLI-VE jsonl", skipped)
    check_layout(path, "SNLI-VE (snli_ve_*.jsonl)", records, ("sentence2", "gold_label"), any_of=ID_KEYS)
    index = {name: i for i, name in enumerate(LABELS)}
    items = []
    for r in records:
        if "sentence2" not in r or "gold_label" not in r or not any(k in r for k in ID_KEYS):
            skipped["missing_field"] += 1
            continue
        iid = image_id(r)
        if iid is None:
            skipped["bad_image_id"] += 1
            continue
        gold = r["gold_label"]
        if gold == "-":
            skipped["no_gold_label"] += 1
            continue
        if not isinstance(gold, str) or gold.strip().lower() not in index:
            skipped["bad_label"] += 1
            continue
        text = r["sentence2"]
        if not isinstance(text, str):
            skipped["bad_sentence"] += 1
            continue
        if not text.strip():
            skipped["empty_sentence"] += 1
            continue
        pid = r.get("pairID")
        items.append(SnliVeItem(pid if isinstance(pid, str) else "", os.path.join(image_root, f"{iid}.jpg"),
                                text.strip(), index[gold.strip().lower()]))
    return items, dict(skipped)
