"""datasets/inspect_shards.py as a user runs it: demo shards plus a shard with broken samples."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import shutil
import subprocess

import pytest

from datasets import inspect_shards  # noqa: E402
from datasets.shards import expand_shards, raw_samples  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
    r = subprocess.run([sys.executable, str(ROOT / "datasets" / "inspect_shards.py"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines(), r.stderr


def test_inspect_demo_and_broken_shards(demo, tmp_path, capsys):
    import webdataset as wds

    out = tmp_path / "shards"
    out.mkdir()
    # a mixed directory in the layout users have: image shards, video shards, one shard with broken samples
    srcs = expand_shards(demo["paths"]["val_images"]) + expand_shards(demo["paths"]["val_videos"])
    for i, src in enumerate(srcs):
        shutil.copy(src, out / f"{i:05d}.tar")
    good = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in raw_samples(expand_shards(demo["paths"]["val_images"]))][:6]
    good[0]["jpg"] = b"broken jpeg"
    good[2]["txt"] = b"\xff\xfe"
    del good[4]["jpg"]
    broken = len(srcs)
    with wds.TarWriter(str(out / f"{broken:05d}.tar"), encoder=False) as tw:
        for s in good:
            tw.write(s)
    n_img, n_vid = demo["args"]["val_images"], demo["args"]["val_videos"]
    pattern = str(out / f"{{00000..{broken:05d}}}.tar")

    lines, err = _run(pattern, "--num-frames", "3", "--image-size", "32")
    assert lines[-1] == f"samples: {n_img + n_vid + 3} bad: 3"
    assert f"image: {n_img + 3}" in lines and f"video: {n_vid}" in lines
    text = "\n".join(lines)
    assert "bad_image: 1" in text and "non_utf8_caption: 1" in text and "missing_media: 1" in text
    assert f"{broken:05d}.tar: 3" in text and good[0]["__key__"] in text
    assert "shard" in err  # the progress bar went to stderr

    # in-process from here on: one interpreter start (torch import) is enough on a loaded CI machine
    assert inspect_shards.main([pattern, "--num-frames", "3", "--image-size", "32", "--workers", "2"]) == 0
    two = capsys.readouterr().out.strip().splitlines()
    assert two == lines

    assert inspect_shards.main([str(out / "{00000..00000}.tar"), "--image-size", "32"]) == 0
    clean = capsys.readouterr().out.strip().splitlines()
    assert clean[-1] == f"samples: {sum(1 for _ in raw_samples([str(out / '00000.tar')]))} bad: 0"
    assert not any("bad by" in x for x in clean)
    assert inspect_shards.main([str(tmp_path / "none-{0..3}.tar")]) == 2
