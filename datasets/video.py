"""mp4 bytes -> sampled frames with decord (reads the file-like fully into memory; no temp file)."""
from __future__ import annotations

import io
import random
import struct

import numpy as np

from .transforms import check_pixels

# decord recovers undecodable frames by repeating neighbours; more than this fraction of recovered frames
# makes the clip an error (a bad sample) rather than silently near-static
FAULT_TOL = 0.1

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}  # boxes on the path moov/trak/.../stsd


def _boxes(data: bytes, start: int, end: int):
    """(type, payload start, payload end) of the ISO-BMFF boxes in data[start:end]; stops at a garbled size."""
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        head = 8
        if size == 1:  # 64-bit size follows
            if i + 16 > end:
                return
            size, head = struct.unpack(">Q", data[i + 8:i + 16])[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - i
        if size < head or i + size > end:
            return
        yield kind, i + head, i + size
        i += size


def mp4_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the largest video track of an mp4 / mov, read from the container header (the visual
    sample entry in moov/trak/mdia/minf/stbl/stsd) without decoding anything; None when it is not found (not an
    ISO-BMFF file, or a garbled one: decord then judges it). decord has no way to tell the frame size before
    decoding a frame, hence this."""
    best = None

    def walk(start: int, end: int, in_video: bool) -> None:
        nonlocal best
        for kind, a, b in _boxes(data, start, end):
            if kind == b"mdia":
                # hdlr: version/flags, pre_defined, then the handler type ("vide" for a video track)
                video = any(k == b"hdlr" and data[ha + 8:ha + 12] == b"vide" for k, ha, _ in _boxes(data, a, b))
                if video:
                    walk(a, b, True)
            elif kind in _CONTAINERS:
                walk(a, b, in_video)
            elif kind == b"stsd" and in_video and b - a >= 8:
                # full box (version, flags), entry count, then sample entries; a VisualSampleEntry holds 6
                # reserved bytes, data_reference_index, 16 bytes pre_defined/reserved, then width and height
                for _, ea, eb in _boxes(data, a + 8, b):
                    if eb - ea >= 28:
                        w, h = struct.unpack(">HH", data[ea + 24:ea + 28])
                        if best is None or w * h > best[0] * best[1]:
                            best = (w, h)

    walk(0, len(data), False)
    return best


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


def decode_clip(data: bytes, num_frames: int, rng: random.Random | None, max_pixels: int | None = None) -> np.ndarray:
    """(num_frames, H, W, 3) uint8. With `max_pixels`, an mp4 / mov whose frames are larger raises TooLarge
    before decord opens it (the size comes from the container header)."""
    if max_pixels is not None:
        size = mp4_frame_size(data)
        if size is not None:
            check_pixels(*size, max_pixels)
    import decord  # imported lazily: image-only runs never load ffmpeg

    # 1 thread: we already run one process per DataLoader worker
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1, fault_tol=FAULT_TOL)
    idx = sample_indices(len(vr), num_frames, rng)
    return vr.get_batch(idx).asnumpy()
