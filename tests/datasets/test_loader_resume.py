"""Train loader: image + video mixing, resampled and pipe: shards, and exact resume the torchtitan way (take 40
batches, save, rebuild, the next 8 are identical) without reading the consumed data again."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import builtins
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets.config import DataConfig, SourceConfig  # noqa: E402
from datasets.loader import build_train_loader  # noqa: E402
from datasets.shards import expand_shards, raw_samples  # noqa: E402


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
            and torch.equal(a["attention_mask"], b["attention_mask"]) and a["__key__"] == b["__key__"]
            and a.get("modality") == b.get("modality"))


def _keys(pattern):
    return {s["__key__"] for s in raw_samples(expand_shards(pattern))}


def _mixed_sources(demo, video_weight=1.0):
    img = demo["paths"]["train_images"]
    a, b = img.replace("{00000..00007}", "{00000..00003}"), img.replace("{00000..00007}", "{00004..00007}")
    return [SourceConfig(a, "image", 1.0), SourceConfig(b, "image", 1.0),
            SourceConfig(demo["paths"]["train_videos"], "video", video_weight)]


def _cfg(sources, **kw):
    base = dict(image_size=32, num_workers=2, shuffle_buffer=30, max_text_len=16, num_frames=4)
    base.update(kw)
    return DataConfig(train=sources, **base)


CASES = {
    "images-0-workers": lambda demo: _cfg([SourceConfig(demo["paths"]["train_images"])], num_workers=0),
    "images-2-workers": lambda demo: _cfg([SourceConfig(demo["paths"]["train_images"])], num_workers=2),
    "image+video-2-workers": lambda demo: _cfg(_mixed_sources(demo), num_workers=2),
    "image+video-0-workers": lambda demo: _cfg(_mixed_sources(demo), num_workers=0),
    "resampled": lambda demo: _cfg([SourceConfig(demo["paths"]["train_images"]),
                                    SourceConfig(demo["paths"]["val_images"], weight=0.5)],
                                   num_workers=2, resampled=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_40_then_8_identical(demo, tok, case):
    cfg = CASES[case](demo)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=5)  # noqa: E731
    ref = _take(mk(), 48)
    first = mk()
    it = iter(first)
    head = [next(it) for _ in range(40)]
    assert all(_same(x, y) for x, y in zip(head, ref[:40]))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds survives serialisation
    del it
    resumed = mk()
    resumed.load_state_dict(state)
    tail = _take(resumed, 8)
    for i, (x, y) in enumerate(zip(tail, ref[40:])):
        assert _same(x, y), f"{case}: resumed batch {40 + i} differs"
    if "video" in case:
        assert {b["modality"] for b in ref} == {"image", "video"}


def test_mixed_batches_single_modality_same_on_every_rank(demo, tok):
    cfg = _cfg(_mixed_sources(demo, video_weight=1.0), num_workers=2)  # image 2 : video 1
    img_keys = _keys(demo["paths"]["train_images"])
    vid_keys = _keys(demo["paths"]["train_videos"])
    per_rank = []
    for rank in range(2):
        batches = _take(build_train_loader(cfg, tok, micro_batch_size=3, rank=rank, world_size=2, seed=1), 45)
        for b in batches:
            if b["modality"] == "image":
                assert b["pixel_values"].shape == (3, 1, 3, 32, 32) and set(b["__key__"]) <= img_keys
            else:
                assert b["pixel_values"].shape == (3, 4, 3, 32, 32) and set(b["__key__"]) <= vid_keys
        per_rank.append([b["modality"] for b in batches])
    assert per_rank[0] == per_rank[1]  # every rank runs the same frame count in a step
    n_video = per_rank[0].count("video")
    assert 5 <= n_video <= 27, n_video  # expected 15 of 45 (p = 1/3); outside this is a > 3-sigma miss


def test_resume_reads_no_consumed_data(demo, tok, monkeypatch):
    """Count the tar bytes a resumed loader reads before its first batch, far into an epoch. Replaying the
    stream from the epoch start (the old design) reads everything consumed so far; seeking reads about one
    shuffle buffer."""
    cfg = _cfg([SourceConfig(demo["paths"]["train_images"])], num_workers=0, shuffle_buffer=20)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)  # noqa: E731
    ref = _take(mk(), 101)
    first = mk()
    _take(first, 100)  # 400 of the epoch's 480 samples
    state = first.state_dict()

    read = {"bytes": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, *a):
            data = self.f.read(*a)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def __iter__(self):
            return iter(self.f)

    def counting_open(file, *a, **k):
        f = real_open(file, *a, **k)
        return Counting(f) if str(file).endswith(".tar") else f

    monkeypatch.setattr(builtins, "open", counting_open)
    resumed = mk()
    resumed.load_state_dict(state)
    batch = _take(resumed, 1)[0]
    monkeypatch.setattr(builtins, "open", real_open)
    assert _same(batch, ref[100])
    shards = expand_shards(demo["paths"]["train_images"])
    epoch_bytes = sum(os.path.getsize(s) for s in shards)
    consumed_bytes = epoch_bytes * 400 / 480
    # one buffer (20) + one batch (4) of ~480 samples is 5% of the epoch; allow for headers and look-ahead
    print(f"resume read {read['bytes']} tar bytes; consumed {consumed_bytes:.0f}")
    assert 0 < read["bytes"] < 0.12 * consumed_bytes, (read["bytes"], consumed_bytes)


def test_resampled_needs_no_shard_count_and_is_endless(demo, tok):
    val = demo["paths"]["val_images"]
    n_shards = len(expand_shards(val))
    cfg = _cfg([SourceConfig(val)], num_workers=2, shuffle_buffer=5)
    with pytest.raises(ValueError, match="fewer than world_size"):  # non-resampled: too few shards is an error
        build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=n_shards + 1, seed=0)
    cfg.resampled = True
    loader = build_train_loader(cfg, tok, micro_batch_size=4, rank=1, world_size=n_shards + 1, seed=0)
    keys = [k for b in _take(loader, 15) for k in b["__key__"]]
    assert len(keys) == 60 and set(keys) <= _keys(val) and len(set(keys)) < 60  # 40 samples, 60 drawn


def test_pipe_urls_read_like_files(demo, tok, tmp_path):
    pat = demo["paths"]["train_videos"]
    mk = lambda shards: build_train_loader(_cfg([SourceConfig(shards, "video")], num_workers=0), tok,  # noqa: E731
                                           micro_batch_size=4, rank=0, world_size=1, seed=2)
    from_files = _take(mk(pat), 12)
    piped = mk(f"pipe:cat {pat}")
    it = iter(piped)
    head = [next(it) for _ in range(8)]
    assert all(_same(x, y) for x, y in zip(head, from_files))
    resumed = mk(f"pipe:cat {pat}")  # a pipe cannot seek: resume reads through, the result is the same
    resumed.load_state_dict(piped.state_dict())
    assert all(_same(x, y) for x, y in zip(_take(resumed, 4), from_files[8:]))

    bad = f"pipe:cat {tmp_path}/no-such-shard.tar"
    with pytest.raises(RuntimeError, match=r"no-such-shard\.tar.*exited with status 1"):
        _take(mk(bad), 1)


def test_mismatched_state_rejected(demo, tok):
    cfg = _cfg([SourceConfig(demo["paths"]["train_images"])], num_workers=2)
    a = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    _take(a, 3)
    for kw, field in ((dict(seed=1), "train.seed"), (dict(world_size=2), "world size")):
        args = dict(micro_batch_size=4, rank=0, world_size=1, seed=0) | kw
        with pytest.raises(ValueError, match=field):
            build_train_loader(cfg, tok, **args).load_state_dict(a.state_dict())
    fewer = _cfg([SourceConfig(demo["paths"]["train_images"].replace("00007", "00005"))], num_workers=2)
    with pytest.raises(ValueError, match="shards"):
        build_train_loader(fewer, tok, micro_batch_size=4, rank=0, world_size=1, seed=0).load_state_dict(a.state_dict())
