"""JSON-lines annotation files (NLVR2's nlvr2/data/*.json, SNLI-VE's snli_ve_*.jsonl): one JSON object a line.

`read_jsonl` yields the objects; a line that is not JSON, or JSON but not an object, is counted ("bad_line" /
"bad_entry") and left out. A file that is not the layout at all (one JSON document such as a list, nothing that
carries the task's key fields) is one ValueError naming the file, raised by `check_layout`.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Iterator


def read_jsonl(path: str, what: str, skipped: Counter) -> list[dict]:
    """The JSON objects of `path`, one a line (blank lines ignored); unreadable lines counted in `skipped`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    out = []
    for line in _lines(text):
        try:
            obj = json.loads(line)
        except ValueError:
            skipped["bad_line"] += 1
            continue
        if not isinstance(obj, dict):
            skipped["bad_entry"] += 1
            continue
        out.append(obj)
    if not out and text.strip():   # e.g. one pretty-printed JSON document (ALBEF / BLIP's preprocessed lists)
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if doc is not None:
            raise ValueError(f"{path}: a single JSON {type(doc).__name__}, not the {what} layout (one JSON object "
                             "a line)")
    return out


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.strip():
            yield line


def check_layout(path: str, what: str, records: list[dict], keys: tuple[str, ...], any_of: tuple = ()) -> None:
    """ValueError unless some record has every key in `keys` (and one of `any_of`, when given)."""
    def fits(r: dict) -> bool:
        return all(k in r for k in keys) and (not any_of or any(k in r for k in any_of))

    if any(fits(r) for r in records):
        return
    need = ", ".join(keys) + (f" and one of {', '.join(any_of)}" if any_of else "")
    got = f"keys {sorted(records[0])[:8]}" if records else "no JSON object lines"
    raise ValueError(f"{path}: not the {what} layout (no line has {need}; got {got})")
