"""Retrieval fine-tuning media read from webdataset shards (datasets/shard_media.py, `media_root: shards:PATTERN`):
the same set, pixels and batches as from the image directory; name matching on make_shards' and img2dataset's KEY.json;
missing names counted."""
import io
import json
import os
import random
import tarfile

import pytest
import torch
from PIL import Image

from datasets.config import DataConfig
from datasets.loader import BadSample
from datasets.make_shards import make_shards
from datasets.retrieval import read_retrieval
from datasets.shard_media import ShardIndex
from datasets.task_loader import MediaReader, TaskLoader
from datasets.task_sets import MediaSet, RetrievalPairs

NAMES = ["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg"]


def _image(seed: int, fmt: str) -> bytes:
    g = random.Random(seed)
    im = Image.new("RGB", (48, 40))
    im.putdata([(g.randrange(256), g.randrange(256), g.randrange(256)) for _ in range(48 * 40)])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """images/train2014/{a..e}: 2 captions each except e (1); ALBEF annotation also naming gone.jpg (on no disk)."""
    root = tmp_path_factory.mktemp("shard_media")
    img = root / "images" / "train2014"
    img.mkdir(parents=True)
    for i, n in enumerate(NAMES):
        (img / n).write_bytes(_image(i, "PNG" if n.endswith(".png") else "JPEG"))
    entries = [{"image": f"train2014/{n}", "caption": f"photo {i} number {k}", "image_id": i}
               for i, n in enumerate(NAMES) for k in range(1 if n == "e.jpg" else 2)]
    entries.append({"image": "train2014/gone.jpg", "caption": "a gone picture", "image_id": 99})
    ann = root / "train.json"
    ann.write_text(json.dumps(entries))
    # one sample per caption (9 samples, the images repeated), 3 per shard -> 3 shards [a a b] [b c c] [d d e]: most
    # images start mid-shard; gone.jpg is not written
    st = make_shards(ann, root / "images", root / "shards", samples_per_shard=3)
    assert (st["samples"], st["shards"], st["skipped_by_reason"]) == (9, 3, {"missing_media": 1})
    return {"root": root, "ann": str(ann), "images": str(root / "images"),
            "shards": "shards:" + str(root / "shards" / "{00000..00002}.tar")}


def test_read_retrieval_from_shards_matches_the_directory(coco):
    d = read_retrieval("albef", coco["ann"], coco["images"])
    s = read_retrieval("albef", coco["ann"], coco["shards"])
    assert len(s.media) == len(d.media) == 5
    assert s.skipped == d.skipped == {"missing_media": 1}
    assert s.media == ["shards:" + n for n in NAMES]
    assert (s.texts, s.txt2media, s.media_ids) == (d.texts, d.txt2media, d.media_ids)
    ix = s.shard_index
    # 9 samples, each named by its path's basename and by KEY.ext: 5 image names + 9 key names; the 4 repeated
    # images (a second caption each) are the duplicates
    assert (len(ix), ix.duplicates, len(ix.urls)) == (14, 4, 3)
    assert ix.read("c.png") == (coco["root"] / "images" / "train2014" / "c.png").read_bytes()
    # a prebuilt index is used as given
    again = read_retrieval("albef", coco["ann"], coco["shards"], shard_index=ix)
    assert again.shard_index is ix and again.media == s.media


def test_media_reader_decodes_shard_bytes_as_the_file(coco):
    s = read_retrieval("albef", coco["ann"], coco["shards"])
    cfg = DataConfig(image_size=32, num_workers=0)
    for train in (False, True):
        read = MediaReader(cfg, train, s.shard_index)
        for n in NAMES:
            path = os.path.join(coco["images"], "train2014", n)
            a = read(path, "image", random.Random(3) if train else None)
            b = read("shards:" + n, "image", random.Random(3) if train else None)
            assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    with pytest.raises(BadSample, match="missing_image"):
        read("shards:gone.jpg", "image", None)


@pytest.mark.parametrize("workers", [0, 2])
def test_task_loader_batches_from_shards_equal_those_from_the_directory(coco, tok, workers):
    cfg = DataConfig(image_size=32, num_workers=workers, max_text_len=16)
    got = []
    for root in (coco["images"], coco["shards"]):
        pairs = RetrievalPairs(read_retrieval("albef", coco["ann"], root), cfg, tok)
        it = iter(TaskLoader(pairs, cfg, batch_size=3, rank=0, world_size=1, seed=7))
        try:
            got.append([next(it) for _ in range(5)])   # 9 pairs -> 3 batches an epoch: into the second epoch
        finally:
            it.close()   # stops the workers before any assert (a failing test must not leave them running)
    for a, b in zip(*got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    ms = MediaSet(read_retrieval("albef", coco["ann"], coco["shards"]), cfg)
    assert torch.equal(ms.load(2, None)["px"],
                       MediaSet(read_retrieval("albef", coco["ann"], coco["images"]), cfg).load(2, None)["px"])


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def test_img2dataset_layout_is_found_by_url_basename_and_key(tmp_path):
    """img2dataset: KEY.jpg + KEY.json {"url", "key", ...} + KEY.txt; the first of two samples with one name wins."""
    rows = [("000000000", "http://images.example.org/train2014/x.jpg?size=big", 1),
            ("000000001", "http://images.example.org/val2014/y.jpg", 2),
            ("000000002", "http://mirror.example.org/x.jpg", 3)]        # same basename as the first
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for key, url, seed in rows:
            _add(tf, f"{key}.jpg", _image(seed, "JPEG"))
            _add(tf, f"{key}.json", json.dumps({"url": url, "key": key, "status": "success"}).encode())
            _add(tf, f"{key}.txt", b"a caption")
    ix = ShardIndex.build(str(tmp_path / "{00000..00000}.tar"))
    assert sorted(ix.where) == ["000000000.jpg", "000000001.jpg", "000000002.jpg", "x.jpg", "y.jpg"]
    assert ix.duplicates == 1
    assert ix.read("x.jpg") == ix.read("000000000.jpg") == _image(1, "JPEG")
    assert ix.read("y.jpg") == _image(2, "JPEG")
    with pytest.raises(KeyError):
        ix.read("z.jpg")
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps({"images": [
        {"filepath": "train2014", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "x"}], "cocoid": 1},
        {"filepath": "val2014", "filename": "y.jpg", "split": "test", "sentences": [{"raw": "y"}], "cocoid": 2},
        {"filepath": "val2014", "filename": "z.jpg", "split": "test", "sentences": [{"raw": "z"}], "cocoid": 3}]}))
    rs = read_retrieval("karpathy", str(ann), "shards:" + str(tmp_path / "{00000..00000}.tar"), "test")
    assert rs.media == ["shards:x.jpg", "shards:y.jpg"] and rs.skipped == {"missing_media": 1}


def test_config_check_names_a_shard_pattern_that_matches_nothing(tmp_path):
    from train.finetune_retrieval import AnnotationSource

    ann = tmp_path / "a.json"
    ann.write_text("[]")
    with pytest.raises(ValueError, match=r"^task\.train\.media_root: shard pattern .* matches no file") as e:
        AnnotationSource("albef", [str(ann)], "shards:" + str(tmp_path / "{00000..00003}.tar")).check("task.train")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="media_root .*matches no file"):
        read_retrieval("albef", str(ann), "shards:" + str(tmp_path / "{00000..00003}.tar"))
