"""Annotation file + media folder -> webdataset shards in the img2dataset / video2dataset layout.

    python datasets/make_shards.py --annotations FILE --root MEDIA_DIR --output OUT_DIR \
        [--samples-per-shard 10000] [--format auto|albef|coco|csv] [--captions all|first] [--shuffle --seed 0]

Accepted annotation formats (auto-detected from the file, or forced with --format):
  * albef: a JSON list of {"image": relpath, "caption": str | [str, ...]} (ALBEF / BLIP pretraining files);
    extra fields are kept in KEY.json. A caption list gives one sample per caption (--captions all, the
    default, as BLIP's caption-level training sets do) or only its first caption (--captions first).
  * coco: COCO captions JSON {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]};
    one sample per annotation (COCO has ~5 captions per image), --captions first keeps one per image.
  * csv: comma-separated with a header row, either WebVid metadata (columns videoid, name, page_dir; the
    video is ROOT/page_dir/videoid.mp4, the caption is `name`) or the generic form (columns path, caption;
    the media file is ROOT/path, image or video by its extension). Other columns go into KEY.json.

Output in OUT_DIR: 00000.tar, 00001.tar, ... each holding KEY.{jpg,png,webp,mp4,webm,mkv,avi} (the original
bytes, never re-encoded; .jpeg is stored as .jpg), KEY.txt (the caption) and KEY.json (source metadata); KEY is
the 5-digit shard id + the index in the shard. Every shard but the last holds exactly --samples-per-shard
samples. stats.json gives per-shard counts, totals and skipped entries by reason with examples; sizes.json
gives {shard name: count} (the file open_clip reads for dataset sizes). Shards are written to a temp file and
renamed, and are byte-identical for the same input and arguments (fixed tar mtime/uid/gid/names). Numbered
shards left from an earlier, larger run in OUT_DIR are removed after the new ones are written.

Skipped (counted, never fatal): missing or empty media file, unsupported media extension, empty caption,
unreadable annotation row (missing/mistyped field, unknown COCO image id, short CSV row). A file that is not
valid JSON / CSV, or lacks the required columns, is a clear error naming the file (and line) instead.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

FORMATS = ("albef", "coco", "csv")
MEDIA_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp",
              "mp4": "mp4", "webm": "webm", "mkv": "mkv", "avi": "avi"}
MTIME = 1_700_000_000  # fixed member mtime: same input -> byte-identical shards
MAX_EXAMPLES = 5  # examples kept per skip reason in stats.json
SHARD_RE = re.compile(r"^\d{5,}\.tar$")
_WS = re.compile(r"\s+")


class AnnotationError(ValueError):
    """The annotation file as a whole cannot be read (bad JSON/CSV, wrong top-level shape, missing columns)."""


class Entry:
    """One sample to write: media path (relative to root, as given), caption, metadata, and where it came from."""
    __slots__ = ("rel", "caption", "meta", "where")

    def __init__(self, rel: str, caption: str, meta: dict, where: str):
        self.rel, self.caption, self.meta, self.where = rel, caption, meta, where


class Skip:
    """An annotation row that yields no sample, with the reason it is counted under."""
    __slots__ = ("reason", "where", "detail")

    def __init__(self, reason: str, where: str, detail: str):
        self.reason, self.where, self.detail = reason, where, detail


def _clean(text) -> str:
    return _WS.sub(" ", text).strip() if isinstance(text, str) else ""


# ------------------------------------------------------------------------------------------------ readers
def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start})") from None


def detect_format(path: Path) -> str:
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if path.suffix.lower() != ".json":
        raise AnnotationError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                              f"pass --format ({'|'.join(FORMATS)})")
    data = _load_json(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list):
        return "albef"
    raise AnnotationError(f"{path}: JSON top level is a {type(data).__name__} without 'images' and 'annotations'; "
                          "expected a COCO captions dict or an ALBEF/BLIP list of {image, caption}")


def read_albef(path: Path, captions: str) -> Iterator[Entry | Skip]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: an ALBEF/BLIP file must be a JSON list, got {type(data).__name__}")
    for i, row in enumerate(data):
        where = f"{path.name}[{i}]"
        if not isinstance(row, dict):
            yield Skip("bad_row", where, f"entry is a {type(row).__name__}, not an object")
            continue
        image, caps = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image:
            yield Skip("bad_row", where, f"'image' must be a non-empty string, got {image!r}")
            continue
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            yield Skip("bad_row", where, f"'caption' must be a string or a list of strings, got {caps!r}"[:200])
            continue
        if captions == "first":
            caps = caps[:1]
        if not caps or not any(_clean(c) for c in caps):
            yield Skip("empty_caption", where, f"image {image!r} has no non-empty caption")
            continue
        extra = {k: v for k, v in row.items() if k not in ("image", "caption")}
        for ci, cap in enumerate(caps):
            if not _clean(cap):
                yield Skip("empty_caption", f"{where}.caption[{ci}]", f"image {image!r}")
                continue
            yield Entry(image, _clean(cap), {"source": extra, "caption_index": ci},
                        f"{where}.caption[{ci}]" if len(caps) > 1 else where)


def read_coco(path: Path, captions: str) -> Iterator[Entry | Skip]:
    data = _load_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise AnnotationError(f"{path}: a COCO captions file needs lists 'images' and 'annotations'")
    files: dict = {}
    for i, im in enumerate(data["images"]):
        if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
            files[im["id"]] = im
        else:
            yield Skip("bad_row", f"{path.name}:images[{i}]", f"needs 'id' and a string 'file_name': {im!r}"[:200])
    seen: set = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path.name}:annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            yield Skip("bad_row", where, f"needs 'image_id' and a string 'caption': {ann!r}"[:200])
            continue
        im = files.get(ann["image_id"])
        if im is None:
            yield Skip("bad_row", where, f"image_id {ann['image_id']!r} is not in 'images'")
            continue
        if captions == "first" and ann["image_id"] in seen:
            continue
        if not _clean(ann["caption"]):
            yield Skip("empty_caption", where, f"image {im['file_name']!r}")
            continue
        seen.add(ann["image_id"])
        meta = {"source": {"image": {k: v for k, v in im.items()},
                           "annotation": {k: v for k, v in ann.items() if k != "caption"}}}
        yield Entry(im["file_name"], _clean(ann["caption"]), meta, where)


def read_csv(path: Path, captions: str) -> Iterator[Entry | Skip]:
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise AnnotationError(f"{path}: cannot open ({e})") from None
    with f:
        try:
            sample = f.read(65536)
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{path}: not UTF-8 text near byte {e.start}") from None
        f.seek(0)
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        if not sample.strip():
            raise AnnotationError(f"{path}: empty file (a header row is required)")
        reader = csv.DictReader(f, delimiter=delim, restkey="__extra__")
        try:
            cols = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError) as e:
            raise AnnotationError(f"{path}:1: cannot read the CSV header ({e})") from None
        if {"videoid", "name", "page_dir"} <= set(cols):
            style = "webvid"
        elif {"path", "caption"} <= set(cols):
            style = "generic"
        else:
            raise AnnotationError(f"{path}:1: header {cols} has neither the WebVid columns (videoid, name, page_dir) "
                                  "nor the generic ones (path, caption)")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                raise AnnotationError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None
            where = f"{path.name}:{reader.line_num}"
            if "__extra__" in row or any(v is None for v in row.values()):
                yield Skip("bad_row", where, f"{len(cols)} columns expected, the row has a different count")
                continue
            if style == "webvid":
                vid, page, cap = row["videoid"].strip(), row["page_dir"].strip(), row["name"]
                if not vid or not page:
                    yield Skip("bad_row", where, "empty videoid or page_dir")
                    continue
                rel = f"{page}/{vid}.mp4"
                extra = {k: v for k, v in row.items() if k != "name"}
            else:
                rel, cap = row["path"].strip(), row["caption"]
                if not rel:
                    yield Skip("bad_row", where, "empty path")
                    continue
                extra = {k: v for k, v in row.items() if k not in ("path", "caption")}
            if not _clean(cap):
                yield Skip("empty_caption", where, f"media {rel!r}")
                continue
            yield Entry(rel, _clean(cap), {"source": extra}, where)


READERS = {"albef": read_albef, "coco": read_coco, "csv": read_csv}


# ------------------------------------------------------------------------------------------------ writing
def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    tf.addfile(ti, io.BytesIO(data))


class ShardWriter:
    """Writes numbered shards into `out`, each to NAME.tmp first and renamed when complete."""

    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.key_digits = max(4, len(str(per_shard - 1)))
        self.counts: list[int] = []
        self._tar = self._tmp = None

    def write(self, ext: str, media: bytes, caption: str, meta: dict) -> str:
        if self._tar is None:
            self._tmp = self.out / f"{len(self.counts):05d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.counts.append(0)
        key = f"{len(self.counts) - 1:05d}{self.counts[-1]:0{self.key_digits}d}"
        meta = {"key": key, "caption": caption, **meta}
        _add(self._tar, f"{key}.{ext}", media)
        _add(self._tar, f"{key}.txt", caption.encode("utf-8"))
        _add(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self.counts[-1] += 1
        if self.counts[-1] == self.per_shard:
            self.close()
        return key

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self._tmp.with_suffix(""))  # NNNNN.tar.tmp -> NNNNN.tar
            self._tar = self._tmp = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._tmp = None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_shards(annotations: str | os.PathLike, root: str | os.PathLike, output: str | os.PathLike, *,
                samples_per_shard: int = 10000, fmt: str = "auto", captions: str = "all", shuffle: bool = False,
                seed: int = 0, progress: bool = False) -> dict:
    """Convert and return the stats dict (also written to OUTPUT/stats.json). Raises AnnotationError on an
    unreadable annotation file; skips (and counts) bad rows and missing media."""
    ann, root, out = Path(annotations), Path(root), Path(output)
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if captions not in ("all", "first"):
        raise ValueError(f"--captions must be 'all' or 'first', got {captions!r}")
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file {ann} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"media root {root} is not a directory")
    fmt = detect_format(ann) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise ValueError(f"--format must be auto or one of {FORMATS}, got {fmt!r}")
    skipped: Counter = Counter()
    examples: dict[str, list] = {}

    def skip(reason: str, where: str, detail: str) -> None:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < MAX_EXAMPLES:
            examples[reason].append({"where": where, "detail": detail})

    # Rows are read in full first: --shuffle needs them all, and a malformed file fails before anything is written.
    entries: list[Entry] = []
    for item in READERS[fmt](ann, captions):
        if isinstance(item, Skip):
            skip(item.reason, item.where, item.detail)
        else:
            entries.append(item)
    rows = len(entries) + sum(skipped.values())  # candidate samples: one per caption (--captions all)
    if shuffle:
        random.Random(seed).shuffle(entries)

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, samples_per_shard)
    modality = Counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(entries), unit="sample", desc=f"shards -> {out}", file=sys.stderr)
    try:
        for e in entries:
            if bar is not None:
                bar.update(1)
            ext = MEDIA_EXTS.get(Path(e.rel).suffix.lower().lstrip("."))
            if ext is None:
                skip("unsupported_media", e.where, f"{e.rel!r}: extension not in {sorted(MEDIA_EXTS)}")
                continue
            try:
                media = (root / e.rel).read_bytes()
            except FileNotFoundError:
                skip("missing_media", e.where, f"{root / e.rel} does not exist")
                continue
            except OSError as exn:  # a directory, no permission, ...
                skip("missing_media", e.where, f"{root / e.rel}: {exn.strerror or exn}")
                continue
            if not media:
                skip("empty_media", e.where, f"{root / e.rel} is an empty file")
                continue
            writer.write(ext, media, e.caption,
                         {"path": e.rel, "format": fmt, "row": e.where, **e.meta})
            modality["video" if ext in ("mp4", "webm", "mkv", "avi") else "image"] += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    names = [f"{i:05d}.tar" for i in range(len(writer.counts))]
    for p in out.iterdir():  # numbered shards of an earlier, larger run would otherwise match the pattern
        if SHARD_RE.match(p.name) and p.name not in names:
            p.unlink()
    total = sum(writer.counts)
    stats = {
        "annotations": str(ann), "format": fmt, "captions": captions, "shuffle": shuffle,
        "seed": seed if shuffle else None, "samples_per_shard": samples_per_shard,
        "pattern": str(out / f"{{00000..{len(names) - 1:05d}}}.tar") if names else None,
        "shards": len(names), "samples": total, "samples_by_modality": dict(modality),
        "per_shard": dict(zip(names, writer.counts)), "entries": rows,
        "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped), "skipped_examples": examples,
    }
    _write_json_atomic(out / "sizes.json", dict(zip(names, writer.counts)))
    _write_json_atomic(out / "stats.json", stats)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--annotations", required=True, help="ALBEF/BLIP JSON list, COCO captions JSON or CSV")
    ap.add_argument("--root", required=True, help="folder the media paths in the annotations are relative to")
    ap.add_argument("--output", required=True, help="folder for NNNNN.tar, stats.json, sizes.json")
    ap.add_argument("--samples-per-shard", type=int, default=10000)
    ap.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    ap.add_argument("--captions", default="all", choices=("all", "first"),
                    help="several captions per image: one sample each (all) or the first only")
    ap.add_argument("--shuffle", action="store_true", help="shuffle samples across shards (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        st = make_shards(a.annotations, a.root, a.output, samples_per_shard=a.samples_per_shard, fmt=a.format,
                         captions=a.captions, shuffle=a.shuffle, seed=a.seed, progress=not a.no_progress)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(f"{st['samples']} samples in {st['shards']} shards ({st['pattern']}), {st['skipped']} skipped "
          f"{st['skipped_by_reason']}; stats in {Path(a.output) / 'stats.json'}")
    if st["samples"] == 0:
        print("make_shards: error: no sample could be written; see stats.json for why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
