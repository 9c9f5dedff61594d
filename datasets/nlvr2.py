"""NLVR2 data (lil-lab/nlvr, nlvr2/): the official JSON-lines annotations and the image files of each pair.

Annotations: nlvr2/data/{train,dev,test1}.json, one JSON object a line with (among others) `identifier`
("split-set_id-pair_id-sentence_id", e.g. "dev-850-0-0"), `sentence`, `label` ("True" / "False"), `left_url`,
`right_url`, and in train.json `directory` (the numbered sub-folder its images were filed under). The images of
an example are `<identifier without its last "-N" part>-img0.png` (left) and `-img1.png` (right) (nlvr2/README.md
"We assume a consistent naming..."; several are JPEG bytes under .png, which the decoder reads by their header).
They are laid out as ViLT's DATA.md and SCL / ViLT's write_nlvr2.py read them:

    images/train/<directory>/train-10108-0-img0.png     train (image_root: images/train)
    dev/dev-0-0-img0.png                                 dev   (image_root: dev)
    test1/test1-0-0-img0.png                             test-P (image_root: test1)

so an example's images are image_root/[<directory>/]<stem>-img{0,1}.png, with the sub-folder taken when the line has
`directory`. Reader-level junk is counted by reason (SKIP_REASONS) and left out; a file that is not this layout is
one ValueError naming it. Missing or broken image files are found when a sample is loaded (datasets/task_sets_pairs.py).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from .jsonl import check_layout, read_jsonl

SKIP_REASONS = ("bad_line", "bad_entry", "missing_field", "bad_identifier", "bad_directory", "bad_label",
                "bad_sentence", "empty_sentence", "duplicate_identifier")
LABELS = {"false": 0, "true": 1}   # the official labels are "True" / "False"; eval/metrics.py compares lower-cased
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_]+(?:-[0-9]+)+$")   # split-set_id-pair_id-sentence_id


@dataclass
class Nlvr2Item:
    identifier: str
    sentence: str
    label: int          # 1 = True, 0 = False
    left: str           # image paths
    right: str


def image_stem(identifier: str) -> str:
    """"train-10108-0-1" -> "train-10108-0": the pair's images are <stem>-img0.png / <stem>-img1.png."""
    return identifier.rsplit("-", 1)[0]


def parse_label(value) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return LABELS.get(value.strip().lower())
    return None


def read_nlvr2(path: str, image_root: str) -> tuple[list[Nlvr2Item], dict[str, int]]:
    """Items in file order and the skipped lines counted by reason."""
    skipped: Counter = Counter()
    records = read_jsonl(path, "NLVR2 jsonl", skipped)
    check_layout(path, "NLVR2 (lil-lab/nlvr nlvr2/data/*.json)", records, ("identifier", "sentence", "label"))
    items, seen = [], set()
    for r in records:
        if any(k not in r for k in ("identifier", "sentence", "label")):
            skipped["missing_field"] += 1
            continue
        ident, sentence = r["identifier"], r["sentence"]
        if not (isinstance(ident, str) and _IDENTIFIER.match(ident) and ident.count("-") >= 2):
            skipped["bad_identifier"] += 1
            continue
        sub = ""
        if "directory" in r:
            d = r["directory"]
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or isinstance(d, str) and d.isdigit()):
                skipped["bad_directory"] += 1
                continue
            sub = str(d)
        label = parse_label(r["label"])
        if label is None:
            skipped["bad_label"] += 1
            continue
        if not isinstance(sentence, str):
            skipped["bad_sentence"] += 1
            continue
        if not sentence.strip():
            skipped["empty_sentence"] += 1
            continue
        if ident in seen:
            skipped["duplicate_identifier"] += 1
            continue
        seen.add(ident)
        base = os.path.join(image_root, sub, image_stem(ident))
        items.append(Nlvr2Item(ident, sentence.strip(), label, f"{base}-img0.png", f"{base}-img1.png"))
    return items, dict(skipped)
