"""Bad input never crashes or hangs the loaders: real broken files written to tmp_path are skipped, counted per
reason with shard and key, logged; too many of them abort with one clear message."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import logging
import os
import tarfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets.config import DataConfig, SourceConfig  # noqa: E402
from datasets.loader import build_eval_loader, build_train_loader  # noqa: E402
from datasets.shards import expand_shards, raw_samples  # noqa: E402


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _write(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as tw:
        for s in samples:
            tw.write(s)
    return str(path)


def _plain(s):
    return {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}


BREAK_IMAGE = {  # sample index -> (how it is broken, the reason the loader must report)
    1: (lambda s: s.update(jpg=s["jpg"][: len(s["jpg"]) // 3]), "bad_image"),  # truncated JPEG
    3: (lambda s: s.update(jpg=b"\xff\xd8\xff\xe0 not really a jpeg"), "bad_image"),
    4: (lambda s: s.update(txt=b"  \n\t "), "empty_caption"),
    6: (lambda s: s.update(txt=b"a red \xff\xfe circle"), "non_utf8_caption"),
    7: (lambda s: s.pop("jpg"), "missing_image"),
    9: (lambda s: s.pop("txt"), "missing_txt"),
}


def _broken_image_shard(demo, path):
    good = [_plain(s) for s in raw_samples(expand_shards(demo["paths"]["val_images"]))][:12]
    for i, (brk, _) in BREAK_IMAGE.items():
        brk(good[i])
    return _write(path, good), good


def _cfg(train, ev=None, modality="image", **kw):
    base = dict(image_size=32, num_workers=0, shuffle_buffer=0, max_text_len=16, num_frames=4)
    base.update(kw)
    return DataConfig(train=[SourceConfig(train, modality)], eval=[SourceConfig(ev or train, modality)], **base)


def test_each_bad_image_reason_skipped_counted_logged(demo, tok, tmp_path, caplog):
    shard, samples = _broken_image_shard(demo, tmp_path / "broken-00000.tar")
    cfg = _cfg(shard)
    loader = build_train_loader(cfg, tok, micro_batch_size=3, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="datasets.loader"):
        keys = [k for b in _take(loader, 2) for k in b["__key__"]]
    bad_keys = {samples[i]["__key__"] for i in BREAK_IMAGE}
    assert len(keys) == 6 and set(keys) == {s["__key__"] for s in samples} - bad_keys
    st = loader.stats()
    expected = {}
    for _, reason in BREAK_IMAGE.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert st["bad_by_reason"] == expected and st["bad_samples"] == len(BREAK_IMAGE)
    assert st["worst_shards"] == [(shard, len(BREAK_IMAGE))] and st["samples_read"] == 12
    logged = caplog.text
    for i, (_, reason) in BREAK_IMAGE.items():
        assert samples[i]["__key__"] in logged and reason in logged
    assert "broken-00000.tar" in logged

    ev = build_eval_loader(cfg, tok, batch_size=4)
    assert sum(len(b["caption"]) for b in ev) == 6 and dict(ev.bad) == expected


def test_bad_video_reasons(demo, tok, tmp_path):
    good = [_plain(s) for s in raw_samples(expand_shards(demo["paths"]["val_videos"]))][:8]
    good[1]["mp4"] = good[1]["mp4"][: len(good[1]["mp4"]) // 2]  # truncated mp4
    good[2]["mp4"] = b"\x00\x00\x00\x18ftypmp42" + os.urandom(300)  # an mp4 header, then noise
    del good[5]["mp4"]
    shard = _write(tmp_path / "vids-00000.tar", good)
    loader = build_train_loader(_cfg(shard, modality="video"), tok, micro_batch_size=5, rank=0, world_size=1,
                                seed=0)
    b = _take(loader, 1)[0]
    assert b["pixel_values"].shape == (5, 4, 3, 32, 32) and b["modality"] == "video"
    assert set(b["__key__"]) == {good[i]["__key__"] for i in (0, 3, 4, 6, 7)}
    assert loader.stats()["bad_by_reason"] == {"bad_video": 2, "missing_video": 1}


def test_truncated_and_corrupt_tar_skip_rest_of_shard(demo, tok, tmp_path):
    src = expand_shards(demo["paths"]["val_images"])[0]
    samples = list(raw_samples([src]))
    data = pathlib.Path(src).read_bytes()
    cut = samples[5]["__offset__"] + 700  # inside sample 5's first member: samples 0-4 survive
    trunc = tmp_path / "cut-00000.tar"
    trunc.write_bytes(data[:cut])
    garbled = bytearray(data)
    garbled[samples[3]["__offset__"]:samples[3]["__offset__"] + 100] = b"\x07" * 100  # a header destroyed
    corrupt = tmp_path / "cut-00001.tar"
    corrupt.write_bytes(bytes(garbled))
    with tarfile.open(trunc) as tf, pytest.raises(tarfile.ReadError):
        tf.getmembers()  # really broken, as python's tarfile sees it
    pattern = str(tmp_path / "cut-{00000..00001}.tar")
    cfg = _cfg(pattern, num_workers=2, shuffle_buffer=0)
    loader = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    keys = [k for b in _take(loader, 4) for k in b["__key__"]]  # 16 samples: more than one pass of each shard
    readable = {s["__key__"] for s in samples[:5]} | {s["__key__"] for s in samples[:3]}
    assert set(keys) == readable
    st = loader.stats()
    assert st["bad_by_reason"].keys() == {"truncated_tar", "corrupt_tar"}
    assert {url for url, _ in st["worst_shards"]} == {str(trunc), str(corrupt)}

    ev = build_eval_loader(cfg, tok, batch_size=16)
    assert sum(len(b["caption"]) for b in ev) == 8 and dict(ev.bad) == {"truncated_tar": 1, "corrupt_tar": 1}


def test_bad_fraction_aborts_with_one_clear_message(demo, tok, tmp_path):
    good = [_plain(s) for s in raw_samples(expand_shards(demo["paths"]["val_images"]))][:40]
    for s in good[::2]:
        s["jpg"] = b"broken"
    shard = _write(tmp_path / "half-bad-00000.tar", good)
    cfg = _cfg(shard, num_workers=1, max_bad_fraction=0.2, bad_check_min_samples=30)
    loader = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(Exception, match=r"(?s)bad.*data\.max_bad_fraction 0\.2.*bad_image.*half-bad-00000\.tar") as e:
        _take(loader, 50)
    assert good[0]["__key__"] in str(e.value)  # the first bad sample is the example
    # below the threshold the same shard trains on (the check waits for bad_check_min_samples)
    ok = build_train_loader(_cfg(shard, max_bad_fraction=0.6, bad_check_min_samples=30), tok,
                            micro_batch_size=4, rank=0, world_size=1, seed=0)
    assert len(_take(ok, 20)) == 20
