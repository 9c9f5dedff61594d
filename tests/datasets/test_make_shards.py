"""datasets/make_shards.py: real media files + annotation files -> CLI -> shards read back by our own loader."""
import sys, pathlib  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import csv
import json
import re
import subprocess
import time
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datasets.config import DataConfig, SourceConfig  # noqa: E402
from datasets.demo_data import encode_mp4  # noqa: E402
from datasets.loader import build_eval_loader  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "datasets" / "make_shards.py"


def run_cli(ann, root, out, *extra, check=True):
    r = subprocess.run([sys.executable, str(SCRIPT), "--annotations", str(ann), "--root", str(root),
                        "--output", str(out), "--no-progress", *map(str, extra)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _jpeg(path: pathlib.Path, seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=85)
    return path.read_bytes()


def _mp4(path: pathlib.Path, seed: int, n_frames=6) -> bytes:
    rng = np.random.default_rng(seed)
    frames = [np.full((32, 32, 3), int(rng.integers(0, 256)), np.uint8) for _ in range(n_frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps=8))
    return path.read_bytes()


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _read_back(out, stats, tok, modality, **kw) -> dict[str, str]:
    """key -> caption, as delivered by the repo's eval loader (every sample once, no skips allowed)."""
    cfg = DataConfig(eval=[SourceConfig(stats["pattern"], modality)], image_size=32, max_text_len=16,
                     num_workers=0, **kw)
    loader = build_eval_loader(cfg, tok, batch_size=4)
    got = {}
    for b in loader:
        assert b["pixel_values"].shape[-2:] == (32, 32)
        got.update(zip(b["__key__"], b["caption"]))
    return got


def _check_shards(out, stats, sources: dict[str, bytes]):
    """Counts in stats.json match the tars; media bytes are the source files' bytes (no re-encode)."""
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [f"{i:05d}.tar" for i in range(stats["shards"])]
    assert json.loads((out / "sizes.json").read_text()) == stats["per_shard"]
    total = 0
    for name in tars:
        members = _tar_members(out / name)
        keys = {m.split(".")[0] for m in members}
        assert stats["per_shard"][name] == len(keys)
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            media = [v for m, v in members.items() if m.startswith(key + ".") and m.split(".")[1] not in ("txt", "json")]
            assert len(media) == 1 and media[0] == sources[meta["path"]]
            assert members[f"{key}.txt"].decode() == meta["caption"]
        total += len(keys)
    assert total == stats["samples"]


def test_albef_json(tmp_path, tok):
    root = tmp_path / "media"
    src = {f"img/{i}.jpg": _jpeg(root / f"img/{i}.jpg", i, size=(30 + 7 * i, 28 + 3 * i)) for i in range(5)}
    ann = [
        {"image": "img/0.jpg", "caption": "a  red   bus "},
        {"image": "img/1.jpg", "caption": ["cap one", "cap two", "cap three"]},
        {"image": "img/2.jpg", "caption": "a dog", "dataset": "vg"},
        {"image": "img/3.jpg", "caption": "   "},          # empty caption
        {"image": "img/missing.jpg", "caption": "gone"},   # missing media
        {"caption": "no image field"},                      # unreadable row
        {"image": "img/4.jpg", "caption": "last one"},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "out"
    r = run_cli(tmp_path / "ann.json", root, out, "--samples-per-shard", 3)
    stats = json.loads((out / "stats.json").read_text())
    want = ["a red bus", "cap one", "cap two", "cap three", "a dog", "last one"]
    assert stats["format"] == "albef" and stats["samples"] == len(want) and stats["shards"] == 2
    assert stats["skipped_by_reason"] == {"empty_caption": 1, "missing_media": 1, "bad_row": 1}
    assert "ann.json[4]" in stats["skipped_examples"]["missing_media"][0]["where"]
    assert "img/missing.jpg" in stats["skipped_examples"]["missing_media"][0]["detail"]
    assert "6 samples in 2 shards" in r.stdout
    _check_shards(out, stats, src)
    got = _read_back(out, stats, tok, "image")
    assert sorted(got.values()) == sorted(want)

    # --captions first: one sample per image
    out1 = tmp_path / "first"
    run_cli(tmp_path / "ann.json", root, out1, "--captions", "first")
    st1 = json.loads((out1 / "stats.json").read_text())
    assert sorted(_read_back(out1, st1, tok, "image").values()) == sorted(["a red bus", "cap one", "a dog", "last one"])


def test_coco_json(tmp_path, tok):
    root = tmp_path / "coco"
    names = ["train2014/a.jpg", "train2014/b.png", "train2014/c.jpg"]
    src = {}
    for i, n in enumerate(names):
        _jpeg(root / n, i)
        if n.endswith(".png"):  # a real PNG, stored as KEY.png
            Image.open(root / n).convert("RGB").save(root / n, format="PNG")
        src[n] = (root / n).read_bytes()
    coco = {"images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)]
            + [{"id": 99, "file_name": "train2014/missing.jpg"}],
            "annotations": [{"id": 1, "image_id": 10, "caption": "A cat."}, {"id": 2, "image_id": 10, "caption": "Cat!"},
                            {"id": 3, "image_id": 11, "caption": "a png"}, {"id": 4, "image_id": 12, "caption": "c1"},
                            {"id": 5, "image_id": 12, "caption": "c2"}, {"id": 6, "image_id": 99, "caption": "x"},
                            {"id": 7, "image_id": 12345, "caption": "unknown image"}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    run_cli(tmp_path / "captions_train2014.json", root, out, "--samples-per-shard", 2)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == "coco" and stats["samples"] == 5 and list(stats["per_shard"].values()) == [2, 2, 1]
    assert stats["skipped_by_reason"] == {"missing_media": 1, "bad_row": 1}
    assert "12345" in stats["skipped_examples"]["bad_row"][0]["detail"]
    _check_shards(out, stats, src)
    exts = Counter(m.split(".")[1] for p in out.glob("*.tar") for m in _tar_members(p))
    assert exts["png"] == 1 and exts["jpg"] == 4
    got = _read_back(out, stats, tok, "image")
    assert sorted(got.values()) == sorted(["A cat.", "Cat!", "a png", "c1", "c2"])


def test_webvid_csv(tmp_path, tok):
    root = tmp_path / "webvid"
    rows = [("1001", "dir_a", "a wave  crashes"), ("1002", "dir_a", "a car drives"), ("2001", "dir_b", "rain"),
            ("3003", "dir_b", "never downloaded")]
    src = {f"{p}/{v}.mp4": _mp4(root / p / f"{v}.mp4", i) for i, (v, p, _) in enumerate(rows[:3])}
    with open(tmp_path / "results_2M_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for v, p, c in rows:
            w.writerow([v, f"https://x/{v}", "PT00H00M10S", p, c])
        f.write("4004,https://x/4004\n")  # short row
    out = tmp_path / "out"
    run_cli(tmp_path / "results_2M_train.csv", root, out, "--samples-per-shard", 2)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == "csv" and stats["samples"] == 3 and stats["samples_by_modality"] == {"video": 3}
    assert stats["skipped_by_reason"] == {"missing_media": 1, "bad_row": 1}
    assert stats["skipped_examples"]["bad_row"][0]["where"] == "results_2M_train.csv:6"
    _check_shards(out, stats, src)
    meta = json.loads(_tar_members(out / "00000.tar")["000000000.json"])
    assert meta["source"]["contentUrl"] == "https://x/1001" and meta["source"]["videoid"] == "1001"
    got = _read_back(out, stats, tok, "video", num_frames=4)
    assert sorted(got.values()) == sorted(["a wave crashes", "a car drives", "rain"])


def test_generic_csv_shuffle_deterministic_and_stale_shards(tmp_path, tok):
    root = tmp_path / "m"
    src = {f"{i}.jpg": _jpeg(root / f"{i}.jpg", i) for i in range(7)}
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "extra"])
        for i in range(7):
            w.writerow([f"{i}.jpg", f"caption {i}", i])
    runs = []
    for name in ("a", "b"):
        if runs:
            time.sleep(1.1)  # a clock-dependent tar mtime would differ between the two runs
        out = tmp_path / name
        run_cli(tmp_path / "pairs.csv", root, out, "--samples-per-shard", 3, "--shuffle", "--seed", 5)
        runs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))})
    assert runs[0] == runs[1] and len(runs[0]) == 3  # byte-identical
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    _check_shards(tmp_path / "a", stats, src)
    got = _read_back(tmp_path / "a", stats, tok, "image")
    assert sorted(got.values()) == sorted(f"caption {i}" for i in range(7))
    order = [json.loads(m)["path"] for n in sorted(runs[0]) for k, m in _tar_members(tmp_path / "a" / n).items()
             if k.endswith(".json")]
    assert order != sorted(order, key=lambda p: int(p.split(".")[0]))  # --shuffle did reorder

    # a rerun into the same folder with fewer shards leaves no stale shard behind
    run_cli(tmp_path / "pairs.csv", root, tmp_path / "a", "--samples-per-shard", 100)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["00000.tar"]
    assert not list((tmp_path / "a").glob("*.tmp"))


@pytest.mark.parametrize("name,body,msg", [
    ("bad.json", '[{"image": "a.jpg",\n "caption": "x"},\n oops]', "bad.json:3:2: not valid JSON"),
    ("top.json", '{"foo": 1}', "expected a COCO captions dict"),
    ("cols.csv", "file,text\na.jpg,x\n", "cols.csv:1: header ['file', 'text'] has neither"),
])
def test_malformed_annotation_file_is_a_clear_error(tmp_path, name, body, msg):
    (tmp_path / name).write_text(body)
    r = run_cli(tmp_path / name, tmp_path, tmp_path / "out", check=False)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # the file is read in full before anything is written


def test_benchmark_smoke(tmp_path):
    """datasets/benchmark.py runs both pipelines (ours, open_clip's) and video on shards made by make_shards,
    and ends with the ratio line. Tiny and short: throughput itself is not tested."""
    pytest.importorskip("open_clip_train")
    root = tmp_path / "m"
    for i in range(12):
        _jpeg(root / f"{i}.jpg", i, size=(48, 40))
    for i in range(4):
        _mp4(root / f"{i}.mp4", i)
    (tmp_path / "img.json").write_text(json.dumps([{"image": f"{i}.jpg", "caption": f"photo {i}"} for i in range(12)]))
    (tmp_path / "vid.csv").write_text("path,caption\n" + "".join(f"{i}.mp4,clip {i}\n" for i in range(4)))
    run_cli(tmp_path / "img.json", root, tmp_path / "img", "--samples-per-shard", 6)
    run_cli(tmp_path / "vid.csv", root, tmp_path / "vid", "--samples-per-shard", 2)
    r = subprocess.run([sys.executable, str(SCRIPT.with_name("benchmark.py")),
                        "--shards", str(tmp_path / "img" / "{00000..00001}.tar"),
                        "--video-shards", str(tmp_path / "vid" / "{00000..00001}.tar"),
                        "--seconds", "0.5", "--warmup", "0", "--rounds", "1", "--workers", "1", "--batch-size", "4",
                        "--video-batch-size", "2", "--image-size", "32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_vs_open_clip: \d+\.\d\d", lines[-1]), lines[-1]
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in
            ("ours_image", "open_clip_image", "ours_video")}
    assert set(rows) == {"ours_image", "open_clip_image", "ours_video"}
    assert all(int(v[1]) > 0 for v in rows.values())  # every pipeline delivered samples
