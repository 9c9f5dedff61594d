"""Retrieval annotation readers: the public layouts of COCO / Flickr30k (ALBEF JSON, Karpathy splits), MSRVTT 1k-A
and LSMDC16 -> one `RetrievalSet` (media paths, captions, caption -> media).

    read_retrieval(fmt, annotations, media_root, split=None, modality=None) -> RetrievalSet

Formats (`annotations` is one path or a list; files of one format are read in order and concatenated):
  albef     JSON list of {"image": path relative to media_root, "caption": str | [str, ...], "image_id"?: any}.
            Train files (coco_train.json, flickr30k_train.json) hold one caption per entry and repeat the image;
            test files (coco_test.json, flickr30k_test.json) hold a caption list per image. Entries are grouped by
            image path; media_ids follow "image_id" where given (ALBEF's img_id), else the path.
  karpathy  dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath"?, "filename", "split",
            "sentences": [{"raw": str, ...}], "cocoid"? | "imgid"?}, ...]}. Path = media_root/filepath/filename
            (COCO: filepath train2014 / val2014) or media_root/filename (Flickr30k has no filepath). `split` selects
            images by their "split" (train / restval / val / test), e.g. ["train", "restval"] or "test"; None: all.
  msrvtt    MSRVTT_data.json ({"videos": [{"video_id": "video123", "split"?, ...}], "sentences": [{"video_id",
            "caption"}, ...]}) and/or a csv. [MSRVTT_data.json, MSRVTT_train.9k.csv]: the json's captions of the
            videos the csv lists (header `video_id`), in csv order; [MSRVTT_JSFUSION_test.csv] alone: its rows
            (header key,vid_key,video_id,sentence; one caption per video); the json alone: every video, or those
            whose "split" is in `split`. Path = media_root/<video_id>.mp4.
  lsmdc     LSMDC16_annos_training.csv / LSMDC16_annos_val.csv / LSMDC16_challenge_1000_publictect.csv: no header,
            one tab-separated row per caption: CLIP_ID, START_ALIGNED, END_ALIGNED, START_EXTRACTED, END_EXTRACTED,
            SENTENCE (a clip id may carry several rows). The release ships clips as avi/<movie>/<CLIP_ID>.avi, the
            movie being CLIP_ID less its last "_<start>-<end>" part (0001_American_Beauty_00.00.51.926-00.00.54.129
            -> 0001_American_Beauty); we use the first of media_root/<CLIP_ID>.mp4, media_root/<CLIP_ID>.avi,
            media_root/<movie>/<CLIP_ID>.mp4, media_root/<movie>/<CLIP_ID>.avi that exists.

Junk is skipped and counted by reason in `RetrievalSet.skipped` (REASONS): per entry / caption / csv row
  bad_entry (not a JSON object), missing_field (no image / filename / video_id / split when selecting by split),
  bad_field (a path or id of the wrong type), missing_caption, bad_caption (not a string), empty_caption (empty
  after strip), bad_row (a csv row with the wrong number of columns),
and per media, after grouping: no_caption (none of its captions is usable; not checked on disk), missing_media (its
file is not on disk; its captions are dropped). Entries outside the selected split are not counted. A file that is
not the layout at all (unreadable, not JSON, wrong top-level type, a csv without the expected columns) raises
ValueError("<path>: <what is wrong>"), one line. Captions are kept as written, whitespace collapsed. Media are in
order of first appearance, texts grouped by media (each media's captions in file order).
media_root "shards:PATTERN" reads the media from webdataset shards instead (datasets/shard_media.py: found by the
basename of their annotation path). This module knows no model and no training code.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

from .shard_media import SHARDS_PREFIX, ShardIndex, is_shards, shard_index as _shard_index

FORMATS = ("albef", "karpathy", "lsmdc", "msrvtt")
MODALITIES = ("image", "video")
DEFAULT_MODALITY = {"albef": "image", "karpathy": "image", "lsmdc": "video", "msrvtt": "video"}
KARPATHY_SPLITS = ("train", "restval", "val", "test")
REASONS = ("bad_entry", "missing_field", "bad_field", "missing_caption", "bad_caption", "empty_caption", "bad_row",
           "no_caption", "missing_media")
LSMDC_COLUMNS = 6
LSMDC_EXTS = (".mp4", ".avi")
MSRVTT_EXT = ".mp4"


@dataclass
class RetrievalSet:
    media: list[str]                  # absolute paths, one per image / video ("shards:NAME" from shards)
    modality: str                     # "image" | "video"
    texts: list[str]                  # every usable caption
    txt2media: list[int]              # text index -> media index
    media_ids: list[int]              # media index -> id; equal ids = the same picture (ALBEF's img_id)
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    shard_index: Optional[ShardIndex] = None   # where "shards:NAME" media are (media_root "shards:PATTERN")

    @property
    def media2txt(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.media]
        for t, m in enumerate(self.txt2media):
            out[m].append(t)
        return out

    def pairs(self) -> list[tuple[int, int]]:
        """(media index, text index) for every caption: one training pair each."""
        return [(m, t) for t, m in enumerate(self.txt2media)]


# ------------------------------------------------------------------------------------------------- file helpers
def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: str):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file ({e.msg} at line {e.lineno} column {e.colno})") from None


def _type_name(obj) -> str:
    return {dict: "object", list: "list", str: "string"}.get(type(obj), type(obj).__name__)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _caption(value, skipped: Counter) -> Optional[str]:
    """A usable caption or None (counted)."""
    if not isinstance(value, str):
        skipped["bad_caption"] += 1
        return None
    text = _clean(value)
    if not text:
        skipped["empty_caption"] += 1
        return None
    return text


class _Builder:
    """Captions grouped by media key, in order of first appearance."""

    def __init__(self):
        self.keys: list = []
        self.index: dict = {}
        self.paths: list[str] = []
        self.ids: list = []
        self.captions: list[list[str]] = []

    def media(self, key, path: str, source_id=None) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.paths.append(path)
            self.ids.append(key if source_id is None else source_id)
            self.captions.append([])
        return i

    def build(self, modality: str, skipped: Counter, resolve=None) -> RetrievalSet:
        """resolve(key, path) -> the media file on disk or None (default: `path` if it is a file)."""
        resolve = resolve or (lambda key, path: path if os.path.isfile(path) else None)
        media, ids, texts, txt2media = [], [], [], []
        dense: dict = {}
        for key, path, sid, caps in zip(self.keys, self.paths, self.ids, self.captions):
            if not caps:
                skipped["no_caption"] += 1
                continue
            path = resolve(key, path)
            if path is None:
                skipped["missing_media"] += 1
                continue
            m = len(media)
            media.append(path)
            ids.append(dense.setdefault(sid, len(dense)))
            for c in caps:
                texts.append(c)
                txt2media.append(m)
        return RetrievalSet(media, modality, texts, txt2media, ids,
                            {r: skipped[r] for r in REASONS if skipped.get(r)})


def _join(root: str, *parts: str) -> str:
    return os.path.abspath(os.path.join(root, *parts))


def _hashable_id(v):
    return v if isinstance(v, (str, int)) and not isinstance(v, bool) else None


# ------------------------------------------------------------------------------------------------------- formats
def _read_albef(paths: list[str], root: str, skipped: Counter) -> _Builder:
    b = _Builder()
    for path in paths:
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: not an ALBEF retrieval file (expected a JSON list of {{image, caption}} "
                             f"entries, got a JSON {_type_name(data)})")
        for e in data:
            if not isinstance(e, dict):
                skipped["bad_entry"] += 1
                continue
            if "image" not in e:
                skipped["missing_field"] += 1
                continue
            img = e["image"]
            if not isinstance(img, str) or not img.strip():
                skipped["bad_field"] += 1
                continue
            if "caption" not in e:
                skipped["missing_caption"] += 1
                continue
            raw = e["caption"]
            if isinstance(raw, list) and not raw:
                skipped["missing_caption"] += 1
            caps = []
            for v in raw if isinstance(raw, list) else [raw]:
                c = _caption(v, skipped)
                if c:
                    caps.append(c)
            rel = os.path.normpath(img.strip())
            iid = _hashable_id(e.get("image_id"))
            m = b.media(rel, _join(root, rel), None if iid is None else ("image_id", iid))
            b.captions[m].extend(caps)
    return b


def _splits(split) -> Optional[list[str]]:
    if split is None:
        return None
    out = [split] if isinstance(split, str) else list(split)
    if not out or not all(isinstance(s, str) and s for s in out):
        raise ValueError(f"split must be a name or a non-empty list of names, got {split!r}")
    return out


def _read_karpathy(paths: list[str], root: str, split: Optional[list[str]], skipped: Counter) -> _Builder:
    if split is not None:
        bad = [s for s in split if s not in KARPATHY_SPLITS]
        if bad:
            raise ValueError(f"karpathy split {bad[0]!r} is not one of {', '.join(KARPATHY_SPLITS)}")
    b = _Builder()
    for path in paths:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            got = f"keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else f"a JSON {_type_name(data)}"
            raise ValueError(f"{path}: not a Karpathy split file (expected an object with an 'images' list, "
                             f"got {got})")
        for e in data["images"]:
            if not isinstance(e, dict):
                skipped["bad_entry"] += 1
                continue
            if split is not None:
                if "split" not in e:
                    skipped["missing_field"] += 1
                    continue
                if e["split"] not in split:
                    continue
            if "filename" not in e:
                skipped["missing_field"] += 1
                continue
            name, sub = e["filename"], e.get("filepath", "")
            if not isinstance(name, str) or not name.strip() or not isinstance(sub, str):
                skipped["bad_field"] += 1
                continue
            sents = e.get("sentences")
            if sents is None:
                skipped["missing_caption"] += 1
                sents = []
            elif not isinstance(sents, list):
                skipped["bad_field"] += 1
                continue
            caps = []
            for s in sents:
                if not isinstance(s, dict):
                    skipped["bad_entry"] += 1
                elif "raw" not in s:
                    skipped["missing_caption"] += 1
                else:
                    c = _caption(s["raw"], skipped)
                    if c:
                        caps.append(c)
            rel = os.path.normpath(os.path.join(sub.strip(), name.strip()))
            sid = _hashable_id(e.get("cocoid", e.get("imgid")))
            m = b.media(rel, _join(root, rel), None if sid is None else ("id", sid))
            b.captions[m].extend(caps)
    return b


def _csv_rows(path: str) -> tuple[list[str], list[dict]]:
    """Header and rows of a comma-separated file; fields beyond the header are joined back onto the last column (an
    unquoted comma in a caption), a short row has None in its missing columns."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"{path}: empty csv file (expected a header line)") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a csv file ({e})") from None
    rows = []
    try:
        for r in reader:
            if not r:
                continue
            if len(r) > len(header):
                r = r[:len(header) - 1] + [",".join(r[len(header) - 1:])]
            rows.append({h: (r[i] if i < len(r) else None) for i, h in enumerate(header)})
    except csv.Error as e:
        raise ValueError(f"{path}: not a csv file ({e})") from None
    return header, rows


def _video_id(v, skipped: Counter) -> Optional[str]:
    if v is None:
        skipped["missing_field"] += 1
        return None
    if not isinstance(v, str) or not v.strip() or "/" in v or "\\" in v or v.strip() in (".", ".."):
        skipped["bad_field"] += 1
        return None
    return v.strip()


def _read_msrvtt(paths: list[str], root: str, split: Optional[list[str]], skipped: Counter) -> _Builder:
    jsons = [p for p in paths if p.lower().endswith(".json")]
    csvs = [p for p in paths if p.lower().endswith(".csv")]
    other = [p for p in paths if p not in jsons and p not in csvs]
    if other or len(jsons) > 1 or len(csvs) > 1:
        why = f"{other[0]}: not a .json or .csv file" if other else "more than one .json or .csv file"
        raise ValueError(f"msrvtt annotations: {why} (expected [MSRVTT_data.json, MSRVTT_train.9k.csv], "
                         "[MSRVTT_JSFUSION_test.csv] or [MSRVTT_data.json])")
    b = _Builder()
    listed: Optional[list[str]] = None
    if csvs:
        path = csvs[0]
        header, rows = _csv_rows(path)
        if "video_id" not in header:
            raise ValueError(f"{path}: not an MSRVTT csv (expected a 'video_id' column, got columns {header[:8]})")
        if "sentence" in header:   # JSFUSION test: the csv carries its captions
            if jsons:
                raise ValueError(f"{path}: has its own captions (column 'sentence'); give it without "
                                 f"{os.path.basename(jsons[0])}")
            if split is not None:
                raise ValueError(f"{path}: split {split!r} does not apply to a csv with captions")
            for r in rows:
                if r["sentence"] is None:
                    skipped["bad_row"] += 1
                    continue
                vid = _video_id(r["video_id"] or None, skipped)
                if vid is None:
                    continue
                c = _caption(r["sentence"], skipped)
                m = b.media(vid, _join(root, vid + MSRVTT_EXT))
                if c:
                    b.captions[m].append(c)
            return b
        if not jsons:
            raise ValueError(f"{path}: lists videos (column 'video_id') without captions; give it after "
                             "MSRVTT_data.json")
        if split is not None:
            raise ValueError(f"{path}: the csv selects the videos; split {split!r} does not apply")
        listed = []
        for r in rows:
            vid = _video_id(r["video_id"] or None, skipped)
            if vid is not None:
                listed.append(vid)
    if not jsons:
        raise ValueError("msrvtt annotations: no file given")
    path = jsons[0]
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        got = f"keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else f"a JSON {_type_name(data)}"
        raise ValueError(f"{path}: not an MSRVTT data file (expected an object with a 'sentences' list, got {got})")
    videos = data.get("videos", [])
    if split is not None and not isinstance(videos, list):
        raise ValueError(f"{path}: no 'videos' list to select split {split!r} from")
    if listed is not None:
        order = listed
    else:
        order = []
        for v in videos if isinstance(videos, list) else []:
            if not isinstance(v, dict):
                skipped["bad_entry"] += 1
                continue
            if split is not None and "split" not in v:
                skipped["missing_field"] += 1
                continue
            if split is not None and v["split"] not in split:
                continue
            vid = _video_id(v.get("video_id"), skipped)
            if vid is not None:
                order.append(vid)
    for vid in order:
        b.media(vid, _join(root, vid + MSRVTT_EXT))
    only = set(order) if (listed is not None or split is not None) else None
    for s in data["sentences"]:
        if not isinstance(s, dict):
            skipped["bad_entry"] += 1
            continue
        vid = s.get("video_id")
        if only is not None and vid not in only:
            continue
        vid = _video_id(vid, skipped)
        if vid is None:
            continue
        if "caption" not in s:
            skipped["missing_caption"] += 1
            continue
        c = _caption(s["caption"], skipped)
        m = b.media(vid, _join(root, vid + MSRVTT_EXT))
        if c:
            b.captions[m].append(c)
    return b


def lsmdc_movie(clip_id: str) -> str:
    """0001_American_Beauty_00.00.51.926-00.00.54.129 -> 0001_American_Beauty (the release's avi/<movie>/ dir)."""
    return clip_id.rsplit("_", 1)[0] if "_" in clip_id else clip_id


def lsmdc_candidates(root: str, clip_id: str) -> list[str]:
    flat = [_join(root, clip_id + ext) for ext in LSMDC_EXTS]
    return flat + [_join(root, lsmdc_movie(clip_id), clip_id + ext) for ext in LSMDC_EXTS]


def lsmdc_resolve(root: str, clip_id: str) -> Optional[str]:
    """The first of `lsmdc_candidates` on disk, or None."""
    return next((p for p in lsmdc_candidates(root, clip_id) if os.path.isfile(p)), None)


def _read_lsmdc(paths: list[str], root: str, skipped: Counter) -> _Builder:
    b = _Builder()
    for path in paths:
        lines = [ln for ln in _read_text(path).split("\n") if ln.strip()]
        rows = [ln.rstrip("\r").split("\t") for ln in lines]
        if rows and not any(len(r) == LSMDC_COLUMNS for r in rows):
            raise ValueError(f"{path}: not an LSMDC annotation file (expected {LSMDC_COLUMNS} tab-separated columns "
                             f"CLIP_ID, START_ALIGNED, END_ALIGNED, START_EXTRACTED, END_EXTRACTED, SENTENCE; the "
                             f"first line has {len(rows[0])})")
        for r in rows:
            if len(r) != LSMDC_COLUMNS:
                skipped["bad_row"] += 1
                continue
            clip = _video_id(r[0] or None, skipped)
            if clip is None:
                continue
            c = _caption(r[5], skipped)
            m = b.media(clip, lsmdc_candidates(root, clip)[0])
            if c:
                b.captions[m].append(c)
    return b


# ---------------------------------------------------------------------------------------------------------- entry
def read_retrieval(fmt: str, annotations: Union[str, list[str]], media_root: str,
                   split: Union[str, list[str], None] = None, modality: Optional[str] = None,
                   shard_index: Optional[ShardIndex] = None) -> RetrievalSet:
    """Read a retrieval split (see the module docstring). modality None: the format's own (image for albef /
    karpathy, video for msrvtt / lsmdc). Raises ValueError (one line) for an unknown format, a bad argument or a
    file that is not the format's layout.

    media_root "shards:PATTERN": the media are read from webdataset shards (datasets/shard_media.py) and found by the
    basename of their annotation path; `media` holds "shards:BASENAME", `shard_index` the index (built once per
    pattern, or the one given), and missing_media counts the names no shard holds."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown retrieval annotation format {fmt!r}; known: {', '.join(FORMATS)}")
    modality = DEFAULT_MODALITY[fmt] if modality is None else modality
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if fmt in ("msrvtt", "lsmdc") and modality != "video":
        raise ValueError(f"{fmt} is a video format; modality {modality!r} does not apply")
    paths = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise ValueError(f"{fmt} annotations: expected a path or a non-empty list of paths, got {annotations!r}")
    paths = [os.fspath(p) for p in paths]
    splits = _splits(split)
    if splits is not None and fmt in ("albef", "lsmdc"):
        raise ValueError(f"{fmt} files have no split field (one file per split); split {split!r} does not apply")
    root = os.fspath(media_root)
    skipped: Counter = Counter()
    resolve = None
    if fmt == "albef":
        b = _read_albef(paths, root, skipped)
    elif fmt == "karpathy":
        b = _read_karpathy(paths, root, splits, skipped)
    elif fmt == "msrvtt":
        b = _read_msrvtt(paths, root, splits, skipped)
    else:
        b = _read_lsmdc(paths, root, skipped)
        resolve = lambda clip, _path: lsmdc_resolve(root, clip)  # noqa: E731
    if not is_shards(root):
        return b.build(modality, skipped, resolve)
    try:
        index = shard_index if shard_index is not None else _shard_index(root[len(SHARDS_PREFIX):])
    except FileNotFoundError as e:
        raise ValueError(f"media_root {root!r}: {e}") from None

    def in_shards(key: str, path: str) -> Optional[str]:
        names = [os.path.basename(p) for p in lsmdc_candidates(root, key)] if fmt == "lsmdc" else [
            os.path.basename(path)]
        return next((SHARDS_PREFIX + n for n in names if n in index), None)

    rset = b.build(modality, skipped, in_shards)
    rset.shard_index = index
    return rset
