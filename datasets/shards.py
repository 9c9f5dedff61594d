"""Shard pattern expansion and the raw (undecoded) sample stream, built on webdataset's tar reader."""
from __future__ import annotations

import os
import random
from typing import Iterator

import braceexpand
from webdataset import tariterators


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand `pattern` (several patterns may be joined with '::', as in open_clip); every file must
    exist. Raises naming the pattern when nothing matches or some files are missing."""
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part.strip())]
    found = [u for u in urls if os.path.isfile(u)]
    if not found:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file (expanded to {len(urls)} names, "
                                f"e.g. {urls[0]!r}); did you generate the data?")
    if len(found) != len(urls):
        missing = [u for u in urls if u not in set(found)]
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} files are missing, "
                                f"e.g. {missing[0]!r}")
    return urls


def raw_samples(urls: list[str]) -> Iterator[dict]:
    """{'__key__', '__url__', ext: bytes, ...} per sample, in tar order, nothing decoded. Local files only.
    A broken tar raises: a damaged shard is worth a loud failure, unlike a single bad member."""
    for url in urls:
        # we open (and always close) the file ourselves: webdataset's opener leaves it to the GC
        with open(url, "rb") as stream:
            yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def shuffled(samples, bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle (same idea as webdataset's `shuffle`) with an explicit rng, so the output order
    is a pure function of (input order, rng seed) and can be replayed on resume without decoding."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(bufsize)
        buf[k], s = s, buf[k]
        yield s
    rng.shuffle(buf)
    yield from buf
