"""mp4 bytes -> sampled frames with decord (reads the file-like fully into memory; no temp file)."""
from __future__ import annotations

import io
import random

import numpy as np

# decord recovers undecodable frames by repeating neighbours; more than this fraction of recovered frames
# makes the clip an error (a bad sample) rather than silently near-static
FAULT_TOL = 0.1


def sample_indices(n: int, num: int, rng: random.Random | None) -> list[int]:
    """`num` frame indices out of `n`: one per equal segment, random inside it (train, rng given) or the
    segment centre (eval). When n < num segments are shorter than a frame, so indices repeat."""
    if n <= 0:
        raise ValueError("video has no frames")
    edges = np.linspace(0, n, num + 1)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo = min(int(a), n - 1)
        hi = max(lo, min(int(np.ceil(b)) - 1, n - 1))  # last whole frame index touching the segment
        out.append(rng.randint(lo, hi) if rng is not None else min(int((a + b) / 2), n - 1))
    return out


def decode_clip(data: bytes, num_frames: int, rng: random.Random | None) -> np.ndarray:
    """(num_frames, H, W, 3) uint8."""
    import decord  # imported lazily: image-only runs never load ffmpeg

    # 1 thread: we already run one process per DataLoader worker
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1, fault_tol=FAULT_TOL)
    idx = sample_indices(len(vr), num_frames, rng)
    return vr.get_batch(idx).asnumpy()
