"""Decode every sample of some shards with the training decoder and report what a run would see.

    python datasets/inspect_shards.py "OUT_DIR/{00000..00009}.tar" [--num-frames 4] [--workers 4] [--image-size 224]
        [--max-image-pixels 36000000]

Prints the shard count, good samples per modality (image or video, by the media member's extension), bad
samples per reason and, for shards with bad samples, per shard with an example key; a progress bar goes to
stderr. The last line is exactly `samples: N bad: M`, where N counts the samples that decode (what training
uses) and M the bad ones (a truncated or garbled tar counts once, for the unreadable rest of its shard; so does
a shard that is not a tar at all, "not_a_tar", or holds no sample, "empty_shard").
Exit status 0 whatever the data holds; 2 when the pattern matches no shard.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a script: import our `datasets` package (not Hugging Face's) and not the files beside this one
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.config import DataConfig  # noqa: E402
from datasets.loader import BadSample, SampleDecoder, media_modality  # noqa: E402
from datasets.shards import TarError, expand_shards, iter_samples  # noqa: E402

_DECODERS: dict = {}


def _init(image_size: int, num_frames: int, max_image_pixels: int = DataConfig.max_image_pixels) -> None:
    cfg = DataConfig(image_size=image_size, num_frames=num_frames, max_image_pixels=max_image_pixels).validate()
    _DECODERS.update({m: SampleDecoder(cfg, m, train=True) for m in ("image", "video")})


def inspect_shard(url: str) -> tuple[str, Counter, Counter, list]:
    """(url, good samples by modality, bad samples by reason, up to 3 (key, reason) examples)."""
    good, bad, examples = Counter(), Counter(), []

    def fail(key, reason):
        bad[reason] += 1
        if len(examples) < 3:
            examples.append((key, reason))

    try:
        for raw, _ in iter_samples(url):
            modality = media_modality(raw)
            if modality is None:
                fail(raw["__key__"], "missing_media")
                continue
            try:  # the training decoder, seeded per key so a rerun reports the same
                _DECODERS[modality](raw, random.Random(raw["__key__"]))
            except BadSample as b:
                fail(raw["__key__"], b.reason)
                continue
            good[modality] += 1
    except TarError as e:
        fail(f"@byte{e.offset}", e.reason)
    return url, good, bad, examples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern", help="shard pattern: brace notation, several joined by '::', pipe:CMD allowed")
    ap.add_argument("--num-frames", type=int, default=4, help="frames decoded per video (as data.num_frames)")
    ap.add_argument("--image-size", type=int, default=224, help="decode resolution (as data.image_size)")
    ap.add_argument("--workers", type=int, default=1, help="processes decoding shards in parallel")
    ap.add_argument("--max-image-pixels", type=int, default=DataConfig.max_image_pixels,
                    help="larger images / video frames are bad (oversize_image / oversize_video), as "
                         "data.max_image_pixels")
    a = ap.parse_args(argv)
    if a.max_image_pixels < 1:
        ap.error("--max-image-pixels must be >= 1")
    try:
        urls = expand_shards(a.pattern)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    good, bad, per_shard = Counter(), Counter(), []
    bar = tqdm(total=len(urls), unit="shard", file=sys.stderr, dynamic_ncols=True)
    if a.workers > 1:
        import multiprocessing as mp

        # fork where there is one: the workers start without importing torch again
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(a.workers, len(urls)), _init, (a.image_size, a.num_frames, a.max_image_pixels))
        results = pool.imap_unordered(inspect_shard, urls)
    else:
        pool = None
        _init(a.image_size, a.num_frames, a.max_image_pixels)
        results = map(inspect_shard, urls)
    try:
        for url, g, b, ex in results:
            good.update(g)
            bad.update(b)
            if b:
                per_shard.append((url, b, ex))
            bar.update(1)
            bar.set_postfix(samples=sum(good.values()), bad=sum(bad.values()))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    print(f"shards: {len(urls)}")
    for m in ("image", "video"):
        print(f"{m}: {good[m]}")
    if bad:
        print("bad by reason:")
        for reason, n in bad.most_common():
            print(f"  {reason}: {n}")
        print("bad by shard:")
        for url, b, ex in sorted(per_shard, key=lambda t: (-sum(t[1].values()), t[0])):
            reasons = ", ".join(f"{r} {n}" for r, n in b.most_common())
            print(f"  {url}: {sum(b.values())} ({reasons}); e.g. {ex[0][0]} ({ex[0][1]})")
    print(f"samples: {sum(good.values())} bad: {sum(bad.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
