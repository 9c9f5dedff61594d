"""Deterministic demo data: coloured-shape scenes and moving-shape clips, written as real webdataset shards.

Layout follows img2dataset / video2dataset: `{split}/{kind}-{SSSSS}.tar` holding `KEY.jpg|mp4`, `KEY.json`,
`KEY.txt` per sample (KEY = 5-digit shard id + 4-digit index), and `{shard}_stats.json` beside each tar.
Held-out (val) captions are unique within val and never used for a train sample, so zero-shot retrieval on
val is unambiguous and measures composition of seen words.

`align_bench/` holds a small ALIGN-BENCH-format set (methods.md §1.7) drawn from two-object descriptions that no
train sample uses: `images/N.jpg` (2x the image size) and `pkls/N.pkl`, each pickle
`{"caption": str, "annotation": {phrase: [{"bbox_mask": [x1, y1, x2, y2], "pixel_mask": HxW bool}]}}`;
see `write_align_bench` for the conventions.

    python datasets/demo_data.py --out data/demo [--seed 0] [--image-size 64] [--train-images N] ...
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make the repo root importable (our `datasets` package, not the HF one).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 2: clips from C-only x264 + bitexact mp4, no run time in the manifest (issue 11)
#                    3: align_bench/ (ALIGN-BENCH format, issue 12)
ALIGN_DIR = "align_bench"
ALIGN_SCALE = 2          # align_bench images are ALIGN_SCALE x image_size px, so a reader's resize is exercised
PICKLE_PROTOCOL = 4      # not 5: numpy pickles arrays under 5 via numpy._core.numeric._frombuffer, which strict
#                          ALIGN-BENCH readers refuse; under 4 via _reconstruct + ndarray + dtype
MTIME = 1_700_000_000  # fixed tar member mtime so the same seed gives byte-identical shards

# Well separated RGB anchors; tests map a pixel to the nearest anchor.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "purple": (145, 60, 200),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": (0.18, 0.24), "large": (0.36, 0.44)}  # side as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class DemoArgs:
    seed: int = 0
    image_size: int = 64
    train_images: int = 6000
    val_images: int = 256
    train_videos: int = 400
    val_videos: int = 64
    train_image_shards: int = 12
    train_video_shards: int = 8
    video_frames: tuple = (8, 16)  # inclusive range of frames per clip
    fps: int = 8
    jpeg_quality: int = 90
    align_items: int = 64  # ALIGN-BENCH-format items in align_bench/ (0: none)


# ----------------------------------------------------------------------------------------------- drawing
def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], color: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=color)
    elif shape == "cross":
        t = max(2, (x1 - x0) // 3)
        draw.rectangle([x0, cy - t / 2, x1 - 1, cy + t / 2], fill=color)
        draw.rectangle([cx - t / 2, y0, cx + t / 2, y1 - 1], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(200, 246)
    bg = np.full((size, size, 3), base, np.int16)
    if rng.random() < 0.5:  # light noise on half the images
        bg += rng.integers(-8, 9, size=(size, size, 3), dtype=np.int16)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _side(rng: np.random.Generator, size_word: str, s: int) -> int:
    lo, hi = SIZES[size_word]
    return int(round(rng.uniform(lo, hi) * s))


def _place(rng: np.random.Generator, side: int, xr: tuple, yr: tuple) -> list[int]:
    """Box of `side` px whose extent stays inside [xr) x [yr)."""
    x0 = int(rng.integers(xr[0], max(xr[0], xr[1] - side) + 1))
    y0 = int(rng.integers(yr[0], max(yr[0], yr[1] - side) + 1))
    return [x0, y0, x0 + side, y0 + side]


def _phrase(obj: dict) -> list[str]:
    return ["a", obj["size"], obj["color"], obj["shape"]]


def _caption_words(objs: list[dict], relation: str | None) -> tuple[list[str], list[dict]]:
    """Caption tokens and the per-word boxes (size/colour/shape words -> their object's box)."""
    words, wboxes = [], []
    for oi, obj in enumerate(objs):
        if oi == 1:
            words += relation.split()
        start = len(words)
        words += _phrase(obj)
        for k, attr in ((1, "size"), (2, "color"), (3, "shape")):
            wboxes.append({"word": obj[attr], "index": start + k, "object": oi, "box": list(obj["box"])})
    return words, wboxes


def make_scene(desc: tuple, s: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """desc: (obj1,) or (obj1, relation, obj2) with obj = (size, color, shape). Returns image + json meta."""
    objs_desc = [desc[0]] if len(desc) == 1 else [desc[0], desc[2]]
    relation = None if len(desc) == 1 else desc[1]
    sides = [_side(rng, d[0], s) for d in objs_desc]
    m = 1  # margin so boxes never touch the border
    full, lo_half, hi_half = (m, s - m), (m, s // 2), (s // 2, s - m)
    if relation is None:
        boxes = [_place(rng, sides[0], full, full)]
    elif relation in ("left of", "right of"):
        a, b = (lo_half, hi_half) if relation == "left of" else (hi_half, lo_half)
        boxes = [_place(rng, sides[0], a, full), _place(rng, sides[1], b, full)]
    else:
        a, b = (lo_half, hi_half) if relation == "above" else (hi_half, lo_half)
        boxes = [_place(rng, sides[0], full, a), _place(rng, sides[1], full, b)]
    img = Image.fromarray(_background(rng, s))
    draw = ImageDraw.Draw(img)
    objs = []
    for (size_w, color_w, shape_w), box in zip(objs_desc, boxes):
        _draw_shape(draw, shape_w, box, COLORS[color_w])
        objs.append({"size": size_w, "color": color_w, "shape": shape_w, "box": box})
    words, wboxes = _caption_words(objs, relation)
    meta = {"objects": objs, "relation": relation, "words": wboxes, "caption": " ".join(words)}
    return img, meta


def make_clip(desc: tuple, s: int, n_frames: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
    """desc: (size, color, shape, direction). The object travels along `direction` across the frame."""
    size_w, color_w, shape_w, direction = desc
    side = _side(rng, size_w, s)
    travel = s - side - 2  # full travel range, keeps the object inside
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    cross_pos = int(rng.integers(1, s - side))  # position on the axis we do not move along
    bg = _background(rng, s)
    frames, track = [], []
    for f in range(n_frames):
        t = f / max(1, n_frames - 1)
        along = 1 + int(round((t if (dx + dy) > 0 else 1 - t) * travel))
        x0, y0 = (along, cross_pos) if dx else (cross_pos, along)
        box = [x0, y0, x0 + side, y0 + side]
        img = Image.fromarray(bg.copy())
        _draw_shape(ImageDraw.Draw(img), shape_w, box, COLORS[color_w])
        frames.append(np.array(img))
        track.append(box)
    caption = f"a {size_w} {color_w} {shape_w} moving {direction}"
    obj = {"size": size_w, "color": color_w, "shape": shape_w, "box": track[0], "track": track}
    words = [{"word": w, "index": i, "object": 0, "box": track[0]}
             for i, w in ((1, size_w), (2, color_w), (3, shape_w))]
    meta = {"objects": [obj], "direction": direction, "words": words, "caption": caption,
            "num_frames": n_frames}
    return frames, meta


# libx264 settings under which the bytes are a function of the frames alone (issue 11). `asm=0` runs x264's C code:
# on AVX-512 CPUs its SIMD macroblock-tree (mbtree) path reads heap memory x264 never initialised when a frame is
# 2-7 macroblocks wide (32-112 px), so about a third of the demo clips came out as different bytes depending on what
# earlier allocations had left in the heap (a second generation in the same process, MALLOC_PERTURB_). The C code is
# also the same on every CPU, where x264's SIMD levels disagree (SSE2 vs AVX; AVX-512 vs AVX2 with mbtree). One
# thread: x264's bytes depend on its thread count. `+bitexact` keeps library version strings out of the file.
X264_OPTIONS = {"crf": "18", "preset": "veryfast", "x264-params": "asm=0", "flags": "+bitexact"}
MP4_OPTIONS = {"fflags": "+bitexact"}  # no "encoder: Lavf<version>" tag; creation_time stays 0 (never set)


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    """H.264 mp4 of RGB frames: the same frames give the same bytes in any process and on any CPU (one PyAV build)."""
    import av  # only the generator needs PyAV

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4", options=dict(MP4_OPTIONS)) as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.thread_count = 1
        st.options = dict(X264_OPTIONS)
        for fr in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ caption spaces
def _objects():
    return [(sz, c, sh) for sz in SIZES for c in COLORS for sh in SHAPES]


def _pair_space():
    objs = _objects()
    return [(a, r, b) for a in objs for r in RELATIONS for b in objs if a != b]


def _clip_space():
    return [o + (d,) for o in _objects() for d in DIRECTIONS]


def _caption_of(desc: tuple) -> str:
    if len(desc) == 4 and desc[3] in DIRECTIONS:
        return f"a {desc[0]} {desc[1]} {desc[2]} moving {desc[3]}"
    if len(desc) == 1:
        return " ".join(_phrase(dict(zip(("size", "color", "shape"), desc[0]))))
    a, r, b = desc
    return " ".join(_phrase(dict(zip(("size", "color", "shape"), a))) + r.split()
                    + _phrase(dict(zip(("size", "color", "shape"), b))))


def plan_descs(args: DemoArgs) -> dict[str, list[tuple]]:
    """Which scene each sample shows. Val picks distinct descriptions; train never uses a val description."""
    pairs, clips, singles = _pair_space(), _clip_space(), [(o,) for o in _objects()]
    if args.val_images > len(pairs):
        raise ValueError(f"val_images={args.val_images} exceeds the {len(pairs)} distinct two-object captions")
    if args.val_videos > len(clips) // 2:
        raise ValueError(f"val_videos={args.val_videos} exceeds half of the {len(clips)} distinct clip captions")
    r = _rng(args.seed, 1)
    val_img = [pairs[i] for i in r.permutation(len(pairs))[: args.val_images]]
    val_vid = [clips[i] for i in r.permutation(len(clips))[: args.val_videos]]
    held_img, held_vid = set(val_img), set(val_vid)
    train_pairs = [p for p in pairs if p not in held_img]
    train_clips = [c for c in clips if c not in held_vid]
    r = _rng(args.seed, 2)
    train_img = []
    for _ in range(args.train_images):  # ~30% single objects, the rest related pairs
        if r.random() < 0.3:
            train_img.append(singles[int(r.integers(len(singles)))])
        else:
            train_img.append(train_pairs[int(r.integers(len(train_pairs)))])
    train_vid = [train_clips[int(r.integers(len(train_clips)))] for _ in range(args.train_videos)]
    return {"train/images": train_img, "val/images": val_img, "train/videos": train_vid, "val/videos": val_vid}


def plan_align_descs(args: DemoArgs, descs: dict[str, list[tuple]]) -> list[tuple]:
    """align_bench scenes: `align_items` distinct two-object descriptions that no train sample shows (so held out
    like val's, which they may share), in a seeded order."""
    seen = set(descs["train/images"])
    unseen = [p for p in _pair_space() if p not in seen]
    if not 0 <= args.align_items <= len(unseen):
        raise ValueError(f"align_items={args.align_items} must be in [0, {len(unseen)}] (the two-object captions "
                         f"no train sample uses)")
    r = _rng(args.seed, 3)
    return [unseen[i] for i in r.permutation(len(unseen))[: args.align_items]]


def shard_counts(n: int, shards: int) -> list[int]:
    """Split n samples into `shards` deliberately unequal counts (like failed downloads do), all > 0."""
    shards = max(1, min(shards, n)) if n > 0 else 0
    if shards == 0:
        return []
    base = n / shards
    w = np.array([1.0 + 0.15 * (((i * 7) % 5) - 2) / 2 for i in range(shards)])
    counts = np.maximum(1, np.floor(w / w.sum() * n)).astype(int)
    counts[-1] += n - counts.sum()
    if counts[-1] < 1 or base < 1:
        counts = np.array([n // shards + (i < n % shards) for i in range(shards)])
    return [int(c) for c in counts]


# ----------------------------------------------------------------------------------------------- writing
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class TreeWriter:
    """Atomic writes of files under one root, remembering each file's size (for a manifest); the task demo
    writers share it."""

    def __init__(self, out: Path):
        self.out, self.sizes = out, {}

    def write(self, rel: str, data: bytes) -> None:
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(p, data)
        self.sizes[rel] = len(data)


def _tar_bytes(samples: list[dict]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=MTIME, user="demo", group="demo",
                       format=tarfile.USTAR_FORMAT) as tw:
        for smp in samples:
            tw.write(smp)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _write_split(out: Path, split_kind: str, descs: list[tuple], n_shards: int, args: DemoArgs,
                 kind_id: int) -> dict:
    split, kind = split_kind.split("/")
    (out / split).mkdir(parents=True, exist_ok=True)
    files, counts = {}, shard_counts(len(descs), n_shards)
    s, idx = args.image_size, 0
    for shard_id, count in enumerate(counts):
        samples = []
        for j in range(count):
            desc = descs[idx]
            key = f"{shard_id:05d}{j:04d}"
            rng = _rng(args.seed, kind_id, idx)
            if kind == "images":
                img, meta = make_scene(desc, s, rng)
                b = io.BytesIO()
                img.save(b, format="JPEG", quality=args.jpeg_quality)
                media = {"jpg": b.getvalue()}
            else:
                n_frames = int(rng.integers(args.video_frames[0], args.video_frames[1] + 1))
                frames, meta = make_clip(desc, s, n_frames, rng)
                media = {"mp4": encode_mp4(frames, args.fps)}
                meta["fps"] = args.fps
            assert meta["caption"] == _caption_of(desc)
            meta.update(key=key, status="success", error_message=None, width=s, height=s,
                        original_width=s, original_height=s)
            samples.append({"__key__": key, **media, "txt": meta["caption"].encode(), "json": _json_bytes(meta)})
            idx += 1
        name = f"{kind}-{shard_id:05d}"
        tar_path = out / split / f"{name}.tar"
        _write_atomic(tar_path, _tar_bytes(samples))
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                 "status_dict": {"success": count}}
        _write_atomic(out / split / f"{name}_stats.json", _json_bytes(stats))
        files[f"{split}/{name}.tar"] = tar_path.stat().st_size
    pattern = f"{split}/{kind}-{{00000..{len(counts) - 1:05d}}}.tar" if counts else None
    return {"files": files, "counts": counts, "pattern": pattern}


def _shape_mask(shape: str, box: list[int], s: int) -> np.ndarray:
    """(s, s) bool: exactly the pixels `_draw_shape` paints for this shape and box (same call, blank 1-channel)."""
    canvas = Image.new("L", (s, s), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas) > 0


def align_annotation(meta: dict, s: int) -> dict:
    """ALIGN-BENCH `annotation` of a `make_scene` meta drawn at s x s px: {phrase: [region]}, in caption order.

    Per object, its phrase (the caption's "SIZE COLOUR SHAPE" words, no article) and then each of those words
    that occurs once in the caption (a word occurring twice, e.g. "small" in "a small red circle left of a small
    blue square", is left out: a reader matches a phrase's first occurrence, which would be the wrong object for
    the second one). Region: {"bbox_mask": [x1, y1, x2, y2], "pixel_mask": (s, s) bool}, the box half-open in
    image pixels (x1, y1 the first column/row covered, x2, y2 one past the last: mask[y1:y2, x1:x2]), the mask
    exactly the drawn shape's pixels (a circle's disc), minus any pixels of an object drawn later (demo pairs never
    overlap). The phrase and its words share one mask array, which the pickle stores once.
    """
    objs = meta["objects"]
    masks = [_shape_mask(o["shape"], o["box"], s) for o in objs]
    for i in range(len(masks)):
        for later in masks[i + 1:]:
            masks[i] = masks[i] & ~later
    words = meta["caption"].split()
    ann = {}
    for oi, (obj, mask) in enumerate(zip(objs, masks)):
        names = [" ".join([obj["size"], obj["color"], obj["shape"]])]
        names += [w["word"] for w in meta["words"] if w["object"] == oi and words.count(w["word"]) == 1]
        for name in names:
            ann[name] = [{"bbox_mask": [int(v) for v in obj["box"]], "pixel_mask": mask}]
    return ann


def write_align_bench(out: Path, descs: list[tuple], args: DemoArgs) -> dict:
    """out/align_bench/images/N.jpg + pkls/N.pkl, N = 0 .. len(descs) - 1; returns {relative path: size}.

    Images are ALIGN_SCALE x image_size px square JPEGs (quality jpeg_quality), scenes drawn by `make_scene` with
    the same captions as the shards; pickles are {"caption", "annotation"} (`align_annotation`) holding only
    dict/list/str/int and numpy bool arrays, written with PICKLE_PROTOCOL, so the bytes are a function of the seed.
    """
    s = ALIGN_SCALE * args.image_size
    files = {}
    for sub in ("images", "pkls"):
        (out / ALIGN_DIR / sub).mkdir(parents=True, exist_ok=True)
    for i, desc in enumerate(descs):
        img, meta = make_scene(desc, s, _rng(args.seed, 30, i))
        assert meta["caption"] == _caption_of(desc)
        b = io.BytesIO()
        img.save(b, format="JPEG", quality=args.jpeg_quality)
        item = {"caption": meta["caption"], "annotation": align_annotation(meta, s)}
        for rel, data in ((f"{ALIGN_DIR}/images/{i}.jpg", b.getvalue()),
                          (f"{ALIGN_DIR}/pkls/{i}.pkl", pickle.dumps(item, protocol=PICKLE_PROTOCOL))):
            _write_atomic(out / rel, data)
            files[rel] = len(data)
    return files


def _manifest_ok(out: Path, args: DemoArgs) -> dict | None:
    try:
        man = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if man.get("version") != FORMAT_VERSION or man.get("args") != json.loads(json.dumps(asdict(args))):
        return None
    for rel, size in man.get("files", {}).items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return man


def generate(out_dir: str | os.PathLike, *, force: bool = False, verbose: bool = False, **kw) -> dict:
    """Write the demo set into out_dir (kwargs are DemoArgs fields) and return its manifest.

    Idempotent: when out_dir already holds a complete set made with the same arguments it returns at once.
    The manifest's `patterns` give brace patterns relative to out_dir; `paths` gives them joined with out_dir.
    """
    args = DemoArgs(**kw)
    if args.image_size % 2 or args.image_size < 16:
        raise ValueError(f"image_size must be even and >= 16 (libx264 needs even sizes), got {args.image_size}")
    out = Path(out_dir)
    if not force:
        man = _manifest_ok(out, args)
        if man is not None:
            man["reused"] = True
            return _with_paths(man, out)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for split in ("train", "val"):  # stale shards from a different earlier run would match no manifest
        for p in (out / split).glob("*") if (out / split).is_dir() else []:
            if p.name.startswith(("images-", "videos-")):
                p.unlink()
    for sub, ext in (("images", ".jpg"), ("pkls", ".pkl")):  # and stale align_bench items (N beyond this run's)
        d = out / ALIGN_DIR / sub
        for p in d.glob("*") if d.is_dir() else []:
            if p.name.endswith((ext, ext + ".tmp")):
                p.unlink()
    descs = plan_descs(args)
    align_descs = plan_align_descs(args, descs)
    plan = [("train/images", args.train_image_shards, 10), ("val/images", 1, 11),
            ("train/videos", args.train_video_shards, 20), ("val/videos", 1, 21)]
    man = {"version": FORMAT_VERSION, "args": json.loads(json.dumps(asdict(args))), "files": {},
           "patterns": {}, "counts": {}}
    for split_kind, n_shards, kind_id in plan:
        res = _write_split(out, split_kind, descs[split_kind], n_shards, args, kind_id)
        if verbose:
            print(f"  {split_kind}: {sum(res['counts'])} samples in {len(res['counts'])} shards", flush=True)
        man["files"].update(res["files"])
        man["patterns"][split_kind.replace("/", "_")] = res["pattern"]
        man["counts"][split_kind.replace("/", "_")] = res["counts"]
    if align_descs:
        man["files"].update(write_align_bench(out, align_descs, args))
        if verbose:
            print(f"  {ALIGN_DIR}: {len(align_descs)} ALIGN-BENCH items", flush=True)
    man["align_bench"] = {"dir": ALIGN_DIR if align_descs else None, "items": len(align_descs),
                          "image_size": ALIGN_SCALE * args.image_size}
    _write_atomic(out / MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode())
    man["seconds"] = round(time.time() - t0, 2)  # returned, not written: the manifest is byte-identical per seed
    man["reused"] = False
    return _with_paths(man, out)


def _with_paths(man: dict, out: Path) -> dict:
    man["paths"] = {k: (str(out / v) if v else None) for k, v in man["patterns"].items()}
    ab = man.get("align_bench", {}).get("dir")
    man["paths"]["align_bench"] = str(out / ab) if ab else None
    return man


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DemoArgs()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--train-images", type=int, default=d.train_images)
    ap.add_argument("--val-images", type=int, default=d.val_images)
    ap.add_argument("--train-videos", type=int, default=d.train_videos)
    ap.add_argument("--val-videos", type=int, default=d.val_videos)
    ap.add_argument("--train-image-shards", type=int, default=d.train_image_shards)
    ap.add_argument("--train-video-shards", type=int, default=d.train_video_shards)
    ap.add_argument("--align-items", type=int, default=d.align_items,
                    help="ALIGN-BENCH-format items written to OUT/align_bench (0: none)")
    ap.add_argument("--force", action="store_true", help="regenerate even when a matching set exists")
    a = ap.parse_args(argv)
    man = generate(a.out, force=a.force, verbose=True, seed=a.seed, image_size=a.image_size,
                   train_images=a.train_images, val_images=a.val_images, train_videos=a.train_videos,
                   val_videos=a.val_videos, train_image_shards=a.train_image_shards,
                   train_video_shards=a.train_video_shards, align_items=a.align_items)
    state = "already complete, nothing to do" if man["reused"] else f"written in {man['seconds']} s"
    total = sum(man["files"].values())
    n_tars = sum(rel.endswith(".tar") for rel in man["files"])
    print(f"demo data in {a.out}: {state} ({n_tars} shards, {len(man['files'])} files, {total / 1e6:.1f} MB)")
    for k, p in man["paths"].items():
        if k == "align_bench":
            ab = man["align_bench"]
            print(f"  {k}: {p}  ({ab['items']} items, {ab['image_size']} px)")
        else:
            print(f"  {k}: {p}  ({sum(man['counts'][k])} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
