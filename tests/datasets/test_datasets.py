"""datasets/: demo generator + webdataset loaders, on real shards written to tmp dirs (real webdataset, decord,
MiniLM tokenizer)."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import contextlib
import ctypes
import io
import json
import os
import random
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import demo_data  # noqa: E402
from datasets.config import DataConfig, RandAugmentConfig, SourceConfig  # noqa: E402
from datasets.loader import SampleDecoder, build_eval_loader, build_train_loader  # noqa: E402
from datasets.shards import raw_samples  # noqa: E402
from datasets.transforms import MEAN_STD, ClipTransform, ImageTransform, normalize_pixels  # noqa: E402
from datasets.video import sample_indices  # noqa: E402


def _cfg(demo, modality="image", **kw):
    kind = "images" if modality == "image" else "videos"
    base = dict(image_size=32, num_workers=2, shuffle_buffer=50, max_text_len=16)
    base.update(kw)
    return DataConfig(train=[SourceConfig(demo["paths"][f"train_{kind}"], modality)],
                      eval=[SourceConfig(demo["paths"][f"val_{kind}"], modality)], **base)


def _samples(pattern_path):
    import braceexpand

    return list(raw_samples(list(braceexpand.braceexpand(pattern_path))))


def _nearest_color(rgb):
    names = list(demo_data.COLORS)
    d = [np.linalg.norm(np.asarray(demo_data.COLORS[n], float) - rgb) for n in names]
    return names[int(np.argmin(d))]


def _center_rgb(img: np.ndarray, box):
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(float).mean(0)


# ------------------------------------------------------------------------------------------------ generator
def _tree(root: pathlib.Path) -> dict:
    """Every file under root: relative path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stats(root: pathlib.Path) -> dict:
    """Every file under root: relative path -> what rewriting it would change (inode, size, mtime, ctime)."""
    stats = {p.relative_to(root).as_posix(): p.stat() for p in sorted(root.rglob("*")) if p.is_file()}
    return {rel: (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in stats.items()}


def _differing(a: dict, b: dict) -> list:
    """Paths whose bytes differ, tars as `path:member` so a failure names the sample."""
    out = []
    for rel in sorted(a.keys() | b.keys()):
        if a.get(rel) == b.get(rel):
            continue
        if rel.endswith(".tar") and rel in a and rel in b:
            ma, mb = (_tar_members(x) for x in (a[rel], b[rel]))
            names = sorted(n for n in ma.keys() | mb.keys() if ma.get(n) != mb.get(n))
            out += [f"{rel}:{n}" for n in names] or [f"{rel} (tar headers)"]
        else:
            out.append(rel)
    return out


def _tar_members(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@contextlib.contextmanager
def _heap_fill(byte: int):
    """While inside, glibc fills each new malloc block with byte ^ 0xff and each freed one with `byte` (mallopt
    M_PERTURB, what MALLOC_PERTURB_ sets); elsewhere a no-op. Any bytes an encoder computes from memory it never
    initialised then differ between two generations, every time rather than now and then."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or mallopt(-6, byte) != 1:  # -6: M_PERTURB
        yield
        return
    try:
        yield
    finally:
        mallopt(-6, 0)


def test_generator_deterministic_and_idempotent(tmp_path, monkeypatch):
    """One seed, one set of bytes in every file (shards, stats, manifest), whatever earlier allocations left in the
    heap and whatever the clock says; reuse leaves every file untouched."""
    kw = dict(image_size=32, train_images=30, val_images=8, train_videos=6, val_videos=4,
              train_image_shards=3, train_video_shards=2)
    with _heap_fill(0xFF):  # new blocks zeroed
        a = demo_data.generate(tmp_path / "a", **kw)
    demo_data.generate(tmp_path / "c", seed=1, **kw)
    # b starts in a later second than a ended: a timestamp from any clock (C libraries' too) differs between a and b
    # at a tar header's or an mp4 box's 1 s resolution. Python's clock is also put a year on.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.02)
    now, now_ns = time.time, time.time_ns
    with monkeypatch.context() as m, _heap_fill(0x55):  # new blocks 0xaa, freed ones 0x55, and a year later
        m.setattr(time, "time", lambda: now() + 366 * 86400)
        m.setattr(time, "time_ns", lambda: now_ns() + 366 * 86400 * 10**9)
        b = demo_data.generate(tmp_path / "b", **kw)
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a["files"] == b["files"] and set(a["files"]) | {demo_data.MANIFEST} <= ta.keys()
    assert any(rel.endswith(".mp4") for tar in a["files"] for rel in _tar_members(ta[tar]))
    assert _differing(ta, tb) == []  # byte for byte, mp4s included
    tc = _tree(tmp_path / "c")
    assert any(ta[rel] != tc[rel] for rel in a["files"])

    before = _stats(tmp_path / "a")
    again = demo_data.generate(tmp_path / "a", **kw)
    assert again["reused"] and again["files"] == a["files"]
    assert _stats(tmp_path / "a") == before  # reused by effect: no file rewritten, added or removed
    rebuilt = demo_data.generate(tmp_path / "a", **{**kw, "val_images": 9})  # new args -> rebuilt
    assert not rebuilt["reused"]
    t9 = _tree(tmp_path / "a")
    assert json.loads(t9[demo_data.MANIFEST])["args"]["val_images"] == 9
    assert len(_tar_members(t9["val/images-00000.tar"])) == 3 * 9


def test_layout_and_metadata(demo):
    out = pathlib.Path(demo["paths"]["train_images"]).parent.parent
    for kind, media in (("train_images", "jpg"), ("val_images", "jpg"), ("train_videos", "mp4"),
                        ("val_videos", "mp4")):
        counts = demo["counts"][kind]
        assert sum(counts) == demo["args"][kind]
        for shard_id, count in enumerate(counts):
            tar = out / (demo["patterns"][kind].split("{")[0] + f"{shard_id:05d}.tar")
            stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
            assert stats["count"] == stats["successes"] == count
            with tarfile.open(tar) as tf:
                names = tf.getnames()
            keys = sorted({n.split(".")[0] for n in names})
            assert len(keys) == count and len(names) == 3 * count
            for k in keys:
                assert len(k) == 9 and k.startswith(f"{shard_id:05d}")
                assert {f"{k}.{media}", f"{k}.json", f"{k}.txt"} <= set(names)
    if len(set(demo["counts"]["train_images"])) == 1:
        pytest.fail("shards were meant to have unequal sample counts")
    for smp in _samples(demo["paths"]["train_images"])[:60]:
        meta = json.loads(smp["json"])
        assert meta["caption"] == smp["txt"].decode() and meta["key"] == smp["__key__"]
        assert meta["status"] == "success" and meta["width"] == meta["height"] == 32
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        words = smp["txt"].decode().split()
        for wb in meta["words"]:  # every content word points at the box of the object it describes
            assert words[wb["index"]] == wb["word"]
            obj = meta["objects"][wb["object"]]
            assert wb["word"] in (obj["size"], obj["color"], obj["shape"]) and wb["box"] == obj["box"]
        assert len(meta["words"]) == 3 * len(meta["objects"])


def test_captions_match_drawn_scene(demo):
    for split in ("train_images", "val_images"):
        for smp in _samples(demo["paths"][split])[:120]:
            meta = json.loads(smp["json"])
            img = np.array(Image.open(io.BytesIO(smp["jpg"])).convert("RGB"))
            for obj in meta["objects"]:
                assert _nearest_color(_center_rgb(img, obj["box"])) == obj["color"], meta["caption"]
                side = obj["box"][2] - obj["box"][0]
                assert (side > 0.3 * 32) == (obj["size"] == "large")
            if meta["relation"]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["box"] for o in meta["objects"])
                assert {"left of": ax1 <= bx0, "right of": bx1 <= ax0, "above": ay1 <= by0,
                        "below": by1 <= ay0}[meta["relation"]]
    import decord

    for smp in _samples(demo["paths"]["train_videos"])[:10]:
        meta = json.loads(smp["json"])
        vr = decord.VideoReader(io.BytesIO(smp["mp4"]), num_threads=1)
        assert len(vr) == meta["num_frames"] and 8 <= len(vr) <= 16
        track = meta["objects"][0]["track"]
        first = vr[0].asnumpy()
        assert _nearest_color(_center_rgb(first, track[0])) == meta["objects"][0]["color"]
        dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
        moved = {"right": dx > 0 and dy == 0, "left": dx < 0 and dy == 0, "down": dy > 0 and dx == 0,
                 "up": dy < 0 and dx == 0}
        assert moved[meta["direction"]] and smp["txt"].decode().endswith("moving " + meta["direction"])


def test_val_captions_unique_and_held_out(demo):
    for kind in ("images", "videos"):
        val = [s["txt"].decode() for s in _samples(demo["paths"][f"val_{kind}"])]
        train = {s["txt"].decode() for s in _samples(demo["paths"][f"train_{kind}"])}
        assert len(val) == len(set(val)) == demo["args"][f"val_{kind}"]
        assert not set(val) & train


# ------------------------------------------------------------------------------------------------ batches
def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("normalize", ["clip", "imagenet"])
def test_image_batch(demo, tok, normalize):
    cfg = _cfg(demo, normalize=normalize, num_workers=1)
    b = _take(build_train_loader(cfg, tok, micro_batch_size=6, rank=0, world_size=1, seed=0), 1)[0]
    # uint8 until the device (engine.to_device normalises with normalize_pixels)
    assert b["pixel_values"].shape == (6, 1, 3, 32, 32) and b["pixel_values"].dtype == torch.uint8
    assert b["normalize"] == normalize
    assert b["input_ids"].shape == b["attention_mask"].shape == (6, 16)
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert len(b["__key__"]) == 6 and all(len(k) == 9 for k in b["__key__"])
    x = normalize_pixels(b["pixel_values"], b["normalize"])
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in MEAN_STD[normalize])
    torch.testing.assert_close(x * std + mean, b["pixel_values"].float() / 255)  # the stated normalisation
    assert b["pixel_values"].float().mean() > 0.5 * 255  # light backgrounds
    # text round-trips through the tokenizer
    caps = {s["__key__"]: s["txt"].decode() for s in _samples(demo["paths"]["train_images"])}
    for ids, key in zip(b["input_ids"], b["__key__"]):
        assert tok.decode(ids, skip_special_tokens=True) == caps[key]

    ev = list(build_eval_loader(cfg, tok, batch_size=16))
    assert [len(x["caption"]) for x in ev] == [16, 16, 8]  # last partial batch kept
    assert ev[0]["pixel_values"].shape == (16, 1, 3, 32, 32)
    ev2 = list(build_eval_loader(cfg, tok, batch_size=16))
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["__key__"] == y["__key__"]
               for x, y in zip(ev, ev2))
    keys = [k for x in ev for k in x["__key__"]]
    assert len(set(keys)) == demo["args"]["val_images"]


def test_video_batch(demo, tok):
    cfg = _cfg(demo, "video", num_frames=4, num_workers=1)
    b = _take(build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=2, seed=0), 1)[0]
    assert b["pixel_values"].shape == (4, 4, 3, 32, 32) and b["pixel_values"].dtype == torch.uint8
    ref = _take(build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0), 8)
    first = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    _take(first, 5)
    resumed = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert all(_same(x, y) for x, y in zip(_take(resumed, 3), ref[5:]))  # random frame choice resumes too
    ev = list(build_eval_loader(_cfg(demo, "video", num_frames=20), tok, batch_size=5))  # 20 > 16 frames
    assert ev[0]["pixel_values"].shape == (5, 20, 3, 32, 32)
    assert sum(len(x["caption"]) for x in ev) == demo["args"]["val_videos"]


def test_train_crops_cover_the_configured_area():
    """crop_scale is the share of the image a train crop covers: (1, 1) on a square image is the whole image (the
    eval transform's output); scale s crops a side of about sqrt(s) of the image (red = 4 x column here)."""
    ramp = np.zeros((64, 64, 3), np.uint8)
    ramp[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    ramp[..., 1] = np.arange(64, dtype=np.uint8)[:, None] * 4
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    data = buf.getvalue()
    full = ImageTransform(32, (1.0, 1.0), False, "clip", train=True)
    ref = ImageTransform(32, (1.0, 1.0), False, "clip", train=False)(data, None)
    for seed in range(5):
        assert torch.equal(full(data, random.Random(seed)), ref)
    zoom = ImageTransform(32, (0.1, 0.1), False, "clip", train=True)
    for seed in range(8):
        red = zoom(data, random.Random(seed))[0, 0].float()
        width = (red.max() - red.min()) / 4 + 1  # crop width in source pixels (aspect 3/4..4/3 around sqrt(0.1))
        assert 0.25 * 64 <= width <= 0.4 * 64, width


def test_frame_sampling_and_same_crop_per_clip():
    assert sample_indices(48, 8, None) == [3, 9, 15, 21, 27, 33, 39, 45]  # segment centres
    assert sample_indices(5, 8, None) == sorted(sample_indices(5, 8, None)) and max(sample_indices(5, 8, None)) <= 4
    rng = random.Random(0)
    for n, f in ((16, 8), (9, 4), (3, 8), (1, 4)):
        idx = sample_indices(n, f, rng)
        assert len(idx) == f and idx == sorted(idx) and 0 <= min(idx) and max(idx) < n
    # identical frames in -> identical frames out means one crop (and one flip) was used for the whole clip
    frame = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    tf = ClipTransform(24, (0.2, 0.5), True, "clip", train=True)
    ra = ClipTransform(24, (0.2, 0.5), True, "clip", train=True, randaugment=RandAugmentConfig(num_ops=2, magnitude=9))
    changed = 0
    for seed in range(5):
        out = tf(np.stack([frame] * 6), random.Random(seed))
        assert out.shape == (6, 3, 24, 24) and all(torch.equal(out[0], out[i]) for i in range(6))
        aug = ra(np.stack([frame] * 6), random.Random(seed))  # one RandAugment draw for the whole clip too
        assert all(torch.equal(aug[0], aug[i]) for i in range(6))
        assert torch.equal(aug, ra(np.stack([frame] * 6), random.Random(seed)))  # a function of the sample seed
        changed += not torch.equal(aug, out)
    assert changed >= 4


# ------------------------------------------------------------------------------------------------ resume
def _same(a, b):
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
            and torch.equal(a["attention_mask"], b["attention_mask"]) and a["__key__"] == b["__key__"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume(demo, tok, world_size):
    cfg = _cfg(demo, num_workers=2)
    mk = lambda r: build_train_loader(cfg, tok, micro_batch_size=4, rank=r, world_size=world_size, seed=3)  # noqa: E731
    seen = []
    for rank in range(world_size):
        ref = _take(mk(rank), 49)
        for cut in (40, 41):  # an odd cut resumes mid worker round-robin (worker 1 is asked first)
            first = mk(rank)
            it = iter(first)
            head = [next(it) for _ in range(cut)]
            assert all(_same(x, y) for x, y in zip(head, ref[:cut]))
            state = first.state_dict()
            del it
            state = json.loads(json.dumps(state))  # it survives a JSON round trip too
            resumed = mk(rank)
            resumed.load_state_dict(state)
            tail = _take(resumed, 8)
            assert all(_same(x, y) for x, y in zip(tail, ref[cut:cut + 8]))
        assert not _same(ref[40], ref[0])
        ref = ref[:48]
        seen.append({k for b in ref for k in b["__key__"]})
        assert len(seen[-1]) == 48 * 4  # within one epoch no sample repeats
    if world_size == 2:
        assert not seen[0] & seen[1]  # ranks see disjoint data


def test_resume_skips_without_decoding(demo, tok, monkeypatch):
    cfg = _cfg(demo, num_workers=0)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)  # noqa: E731
    ref = _take(mk(), 130)  # 520 samples: crosses the 480-sample epoch of the single worker
    first = mk()
    _take(first, 125)
    calls = []
    orig = SampleDecoder.__call__
    monkeypatch.setattr(SampleDecoder, "__call__", lambda self, raw, rng: calls.append(1) or orig(self, raw, rng))
    resumed = mk()
    resumed.load_state_dict(first.state_dict())
    tail = _take(resumed, 5)
    assert all(_same(x, y) for x, y in zip(tail, ref[125:130]))
    assert len(calls) == 5 * 4  # consumed samples were skipped before decode
    assert first.state_dict()["workers"][0]["sources"][0]["epoch"] >= 1  # really crossed into epoch 1


def test_weighted_sources_mix_and_resume(demo, tok):
    pat = demo["paths"]["train_images"]
    a, b = pat.replace("{00000..00007}", "{00000..00003}"), pat.replace("{00000..00007}", "{00004..00007}")
    cfg = DataConfig(train=[SourceConfig(a, weight=3.0), SourceConfig(b, weight=1.0)], image_size=32,
                     num_workers=0, shuffle_buffer=20, max_text_len=16)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=8, rank=0, world_size=1, seed=0)  # noqa: E731
    ref = _take(mk(), 30)
    from_a = sum(int(k[:5]) < 4 for x in ref[:25] for k in x["__key__"])
    assert 0.65 < from_a / 200 < 0.85  # ~3:1
    first = mk()
    _take(first, 25)
    resumed = mk()
    resumed.load_state_dict(first.state_dict())
    assert all(_same(x, y) for x, y in zip(_take(resumed, 5), ref[25:]))


def test_load_state_mismatch_rejected(demo, tok):
    cfg = _cfg(demo, num_workers=2)
    a = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    b = build_train_loader(cfg, tok, micro_batch_size=8, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        b.load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------------------ errors
def test_shard_errors(demo, tok, tmp_path):
    cfg = _cfg(demo, num_workers=2)
    with pytest.raises(ValueError, match=r"images-\{00000\.\.00007\}.*fewer than world_size"):
        build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=8, seed=0)
    missing = str(tmp_path / "nothing-{000..003}.tar")
    bad = DataConfig(train=[SourceConfig(missing)], eval=[SourceConfig(missing)])
    with pytest.raises(ValueError, match=r"^data\.train\[0\]\.shards: .*nothing-"):
        build_train_loader(bad, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match=r"^data\.eval\[0\]\.shards: .*nothing-"):
        build_eval_loader(bad, tok, batch_size=4)
    with pytest.raises(ValueError, match="crop_scale"):
        DataConfig(crop_scale=[0.0, 1.0]).validate()


def test_bad_samples_skipped_and_counted(demo, tok, tmp_path):
    import webdataset as wds

    good = _samples(demo["paths"]["val_images"])[:10]
    tar = tmp_path / "broken-00000.tar"
    with wds.TarWriter(str(tar), encoder=False) as tw:
        for i, s in enumerate(good):
            smp = {"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"], "json": s["json"]}
            if i == 2:
                smp["jpg"] = s["jpg"][: len(s["jpg"]) // 3]  # truncated jpeg
            if i == 4:
                smp["jpg"] = b"not a jpeg at all"
            if i == 5:
                smp["txt"] = b"  \n "
            if i == 7:
                del smp["jpg"]
            tw.write(smp)
    cfg = DataConfig(train=[SourceConfig(str(tar))], eval=[SourceConfig(str(tar))], image_size=32,
                     num_workers=0, shuffle_buffer=0, max_text_len=16)
    loader = build_train_loader(cfg, tok, micro_batch_size=3, rank=0, world_size=1, seed=0)
    batches = _take(loader, 2)
    keys = [k for b in batches for k in b["__key__"]]
    bad_keys = {good[i]["__key__"] for i in (2, 4, 5, 7)}
    assert len(keys) == 6 and not set(keys) & bad_keys
    st = loader.stats()
    assert st["bad_samples"] == 4
    assert st["bad_by_reason"] == {"bad_image": 2, "empty_caption": 1, "missing_image": 1}
    ev = build_eval_loader(cfg, tok, batch_size=4)
    assert sum(len(b["caption"]) for b in ev) == 6 and sum(ev.bad.values()) == 4


def test_our_datasets_package_is_not_hf():
    import datasets
    import transformers  # noqa: F401
    import webdataset  # noqa: F401

    assert pathlib.Path(datasets.__file__).resolve().parent == pathlib.Path(__file__).resolve().parents[2] / "datasets"
