"""Task media read from webdataset shards instead of a directory: `media_root: shards:PATTERN`.

`ShardIndex.build(PATTERN)` reads every shard of the brace pattern once (datasets/shards.py) and maps a media NAME to
the (shard, byte offset) of the sample holding it; `read(NAME)` then seeks there and returns the media bytes. The
annotation files name images by path, so a sample is found by the basename of that path. A sample's names:
  * the basename of the source its KEY.json records: "path" (datasets/make_shards.py: the annotation's relative
    path, e.g. train2014/COCO_train2014_000000057870.jpg) or else "url" (img2dataset: the downloaded URL, its path
    part; e.g. .../train2014/COCO_train2014_000000057870.jpg);
  * as a fallback, its key + "." + the media extension stored (000010042.jpg).
Names are matched exactly (case-sensitive). A name held by several samples (make_shards writes an image once per
caption) resolves to the first one in shard order; `duplicates` counts the others. A shard that turns out broken while
indexing keeps the samples read before the damage and is listed in `broken`. The index is plain lists and dicts, so it
pickles into DataLoader workers.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Optional
from urllib.parse import urlsplit

from .shards import TarError, expand_shards, iter_samples, read_samples_at

log = logging.getLogger(__name__)

SHARDS_PREFIX = "shards:"
MEDIA_EXTS = ("jpg", "jpeg", "png", "webp", "mp4", "webm", "mkv", "avi")


def is_shards(media_root) -> bool:
    return isinstance(media_root, str) and media_root.startswith(SHARDS_PREFIX)


def media_ext(sample: dict) -> Optional[str]:
    return next((e for e in MEDIA_EXTS if e in sample), None)


def source_name(meta) -> Optional[str]:
    """The basename of the source path a sample's KEY.json records (make_shards "path", img2dataset "url")."""
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("path"), str) and meta["path"].strip():
        name = posixpath.basename(meta["path"].strip().replace("\\", "/"))
    elif isinstance(meta.get("url"), str) and meta["url"].strip():
        name = posixpath.basename(urlsplit(meta["url"].strip()).path)
    else:
        return None
    return name or None


class ShardIndex:
    def __init__(self, pattern: str, urls: list[str], where: dict[str, tuple[int, int]], duplicates: int = 0,
                 broken: Optional[list[str]] = None):
        self.pattern, self.urls, self.where = pattern, urls, where   # where: name -> (index into urls, offset)
        self.duplicates, self.broken = duplicates, broken or []

    @classmethod
    def build(cls, pattern: str) -> "ShardIndex":
        """Scan every shard of `pattern` once. Raises FileNotFoundError (one line) when no shard matches."""
        urls = expand_shards(pattern)
        where: dict[str, tuple[int, int]] = {}
        duplicates, broken = 0, []
        for u, url in enumerate(urls):
            try:
                for smp, _ in iter_samples(url, 0, u):
                    ext = media_ext(smp)
                    if ext is None:
                        continue
                    try:
                        meta = json.loads(smp["json"]) if "json" in smp else None
                    except ValueError:
                        meta = None
                    at = (u, smp["__offset__"])
                    for name in (source_name(meta), posixpath.basename(smp["__key__"]) + "." + ext):
                        if name is None:
                            continue
                        if name not in where:
                            where[name] = at
                        elif where[name] != at:
                            duplicates += 1
            except TarError as e:
                log.warning("shard index %s: %s (the samples before it are kept)", pattern, e)
                broken.append(url)
        log.info("shard index %s: %d media names in %d shards (%d duplicate names, %d broken shards)",
                 pattern, len(where), len(urls), duplicates, len(broken))
        return cls(pattern, urls, where, duplicates, broken)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> bytes:
        """The media bytes of `name`; KeyError when no sample has that name."""
        u, offset = self.where[name]
        url = self.urls[u]
        smp = read_samples_at(url, [offset], u)[offset]
        ext = media_ext(smp)
        if ext is None:
            raise KeyError(name)
        return smp[ext]


_CACHE: dict = {}


def shard_index(pattern: str) -> ShardIndex:
    """ShardIndex.build, remembered per pattern in this process while the shard files stay unchanged (the train and
    eval splits usually share one media_root)."""
    urls = expand_shards(pattern)
    sig = tuple((u, os.path.getsize(u), os.path.getmtime(u)) if os.path.isfile(u) else (u,) for u in urls)
    hit = _CACHE.get(pattern)
    if hit is None or hit[0] != sig:
        _CACHE.clear()
        hit = _CACHE[pattern] = (sig, ShardIndex.build(pattern))
    return hit[1]
