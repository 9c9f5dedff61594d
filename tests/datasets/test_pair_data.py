"""NLVR2 / SNLI-VE data: the readers (datasets/nlvr2.py, datasets/snli_ve.py) on small files written here in the real
layouts (good lines and junk, with the counts by reason; a file in another layout is one ValueError naming it), the
task datasets (datasets/task_sets_pairs.py), and the demo writer (datasets/demo_pairs.py): byte-identical per seed,
read with the counts it promises, and every label true of the scenes by a parse of the text done here."""
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import demo_pairs
from datasets.demo_data import COLORS
from datasets.nlvr2 import read_nlvr2
from datasets.snli_ve import LABELS, read_snli_ve


def write_lines(path, lines):
    with open(path, "w") as f:
        for x in lines:
            f.write((x if isinstance(x, str) else json.dumps(x)) + "\n")
    return str(path)


def nl(identifier, sentence="There are two dogs.", label="True", **kw):
    return {"validation": {"3": label}, "sentence": sentence, "left_url": "http://x/a.jpg", "writer": "7",
            "label": label, "right_url": "http://x/b.jpg", "synset": "dog", "query": "dogs3",
            "identifier": identifier, **kw}


# ----------------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_reader_reads_the_official_lines_and_counts_the_junk(tmp_path):
    path = write_lines(tmp_path / "train.json", [
        nl("train-10108-0-0", directory=0),
        nl("train-10108-0-1", "One image shows a cat.", "False", directory=0),
        nl("train-52-3-1", " Both images show  boats. ", "true", directory="12"),   # label case, string dir
        "{not json",                                                 # bad_line
        "[1, 2]",                                                    # bad_entry
        {"identifier": "train-1-0-0", "sentence": "x"},             # missing_field (no label)
        nl("../../etc-1-0-0", directory=1),                          # bad_identifier
        nl("train-77", directory=1),                                 # bad_identifier (no pair part)
        nl("train-8-1-0", directory="x"),                            # bad_directory
        nl("train-8-2-0", label="yes", directory=1),                 # bad_label
        nl("train-8-3-0", sentence=5, directory=1),                  # bad_sentence
        nl("train-8-3-1", sentence="   ", directory=1),              # empty_sentence
        nl("train-10108-0-0", "Again.", directory=0),               # duplicate_identifier
        "",
    ])
    items, skipped = read_nlvr2(path, "/data/nlvr2/images/train")
    assert [(i.identifier, i.sentence, i.label) for i in items] == [
        ("train-10108-0-0", "There are two dogs.", 1), ("train-10108-0-1", "One image shows a cat.", 0),
        ("train-52-3-1", "Both images show  boats.", 1)]
    assert (items[0].left, items[0].right) == ("/data/nlvr2/images/train/0/train-10108-0-img0.png",
                                               "/data/nlvr2/images/train/0/train-10108-0-img1.png")
    assert items[2].right == "/data/nlvr2/images/train/12/train-52-3-img1.png"
    assert skipped == {"bad_line": 1, "bad_entry": 1, "missing_field": 1, "bad_identifier": 2, "bad_directory": 1,
                       "bad_label": 1, "bad_sentence": 1, "empty_sentence": 1, "duplicate_identifier": 1}
    # dev / test1 lines have no `directory`: the images sit in the split directory itself
    dev = write_lines(tmp_path / "dev.json", [nl("dev-850-2-1", label="False", extra_validations={"4": "False"})])
    items, skipped = read_nlvr2(dev, "/data/nlvr2/dev")
    assert (items[0].left, items[0].label, skipped) == ("/data/nlvr2/dev/dev-850-2-img0.png", 0, {})


@pytest.mark.parametrize("content, message", [
    # ALBEF / BLIP's preprocessed nlvr_train.json: one JSON list, pretty-printed
    (json.dumps([{"images": ["a.png", "b.png"], "sentence": "s", "label": 1}], indent=1),
     "a single JSON list, not the NLVR2 jsonl layout"),
    (json.dumps({"Flickr30K_ID": "1", "sentence2": "s", "gold_label": "neutral"}),
     "not the NLVR2 (lil-lab/nlvr nlvr2/data/*.json) layout (no line has identifier, sentence, label; got keys"),
    ("", "no JSON object lines"),
])
def test_nlvr2_wrong_layout_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_nlvr2(str(path), str(tmp_path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- SNLI-VE
def ve(fid, hyp, gold, key="Flickr30K_ID", **kw):
    line = {key: fid, "annotator_labels": [gold], "captionID": f"{fid}.jpg#0", "gold_label": gold,
            "pairID": f"{fid}.jpg#0r1{gold[0]}", "sentence1": "Two dogs play.", "sentence2": hyp, **kw}
    return dict(sorted(line.items()))


def test_snli_ve_reader_reads_the_release_lines_and_counts_the_junk(tmp_path):
    path = write_lines(tmp_path / "snli_ve_train.jsonl", [
        ve("3416050480", "Dogs are playing.", "entailment"),
        ve(1000092795, "The dogs are asleep.", "contradiction"),           # an int id
        ve("36979.jpg", " The dogs are brothers. ", "neutral", key="Flikr30kID"),   # the first release's key
        ve("1", "A cat.", "-"),                                            # no_gold_label
        ve("1", "A cat.", "maybe"),                                        # bad_label
        ve("../1", "A cat.", "neutral"),                                   # bad_image_id
        ve("1", "", "neutral"),                                            # empty_sentence
        ve("1", None, "neutral"),                                          # bad_sentence
        {"Flickr30K_ID": "1", "sentence2": "no label"},                    # missing_field
        "garbage",                                                         # bad_line
    ])
    items, skipped = read_snli_ve(path, "/f30k/flickr30k-images")
    assert LABELS == ("entailment", "neutral", "contradiction")
    assert [(i.image, i.hypothesis, i.label) for i in items] == [
        ("/f30k/flickr30k-images/3416050480.jpg", "Dogs are playing.", 0),
        ("/f30k/flickr30k-images/1000092795.jpg", "The dogs are asleep.", 2),
        ("/f30k/flickr30k-images/36979.jpg", "The dogs are brothers.", 1)]
    assert items[0].pair_id == "3416050480.jpg#0r1e"
    assert skipped == {"no_gold_label": 1, "bad_label": 1, "bad_image_id": 1, "empty_sentence": 1,
                       "bad_sentence": 1, "missing_field": 1, "bad_line": 1}


def test_snli_ve_wrong_layout_is_one_line_naming_the_file(tmp_path):
    path = write_lines(tmp_path / "dev.json", [nl("dev-1-0-0")])   # an NLVR2 file
    with pytest.raises(ValueError) as e:
        read_snli_ve(path, str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: not the SNLI-VE (snli_ve_*.jsonl) layout (no line has sentence2, gold_label "
                          "and one of Flickr30K_ID, Flikr30kID") and "\n" not in msg


# ----------------------------------------------------------------------------------------------- the demo sets
def tree_hash(root) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


SMALL = dict(train=12, dev=4, test=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return root, {"nlvr2": demo_pairs.write_nlvr2(root, None, 3, **SMALL),
                  "snli_ve": demo_pairs.write_snli_ve(root, None, 3, **SMALL)}


def test_same_seed_same_bytes_other_seed_other_files(demo, tmp_path):
    root, man = demo
    again = demo_pairs.write_pairs(tmp_path / "a", None, 3, **{f"{t}_{s}": n for t in ("nlvr2", "snli_ve")
                                                                 for s, n in SMALL.items()})
    assert tree_hash(root) == tree_hash(tmp_path / "a")
    assert again == man
    assert set(man["nlvr2"]["files"]) | set(man["snli_ve"]["files"]) == set(tree_hash(root))
    # another seed over the same directory: other images, none of the old ones left behind
    demo_pairs.write_pairs(tmp_path / "a", None, 4)
    demo_pairs.write_pairs(tmp_path / "b", None, 4)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b") != tree_hash(root)


def painted_colors(path) -> set:
    anchors = np.array(list(COLORS.values()), float)
    px = np.asarray(Image.open(path).convert("RGB"), float).reshape(-1, 3)
    d = ((px[:, None] - anchors[None]) ** 2).sum(-1)
    near = Counter(np.argmin(d, 1)[d.min(1) < 40 ** 2].tolist())
    return {list(COLORS)[i] for i, n in near.items() if n >= 12}


NUM = {"one": 1, "two": 2, "three": 3, "four": 4}


def nlvr2_truth(sentence: str, left: list, right: list) -> bool:
    """The statement's truth about (left, right) lists of (size, color, shape), by a parse written here."""
    def colors(objs):
        return {o[1] for o in objs}

    s = sentence.rstrip(".")
    if m := re.fullmatch(r"The (left|right) image contains an? (\w+) (\w+)", s):
        objs = left if m[1] == "left" else right
        return (m[2], m[3]) in {(o[1], o[2]) for o in objs}
    if m := re.fullmatch(r"Both images contain an? (\w+)", s):
        return m[1] in {o[2] for o in left} and m[1] in {o[2] for o in right}
    if m := re.fullmatch(r"Exactly one image contains an? (\w+) object", s):
        return (m[1] in colors(left)) + (m[1] in colors(right)) == 1
    if m := re.fullmatch(r"Neither image contains an? (\w+) object", s):
        return m[1] not in colors(left) and m[1] not in colors(right)
    if m := re.fullmatch(r"There are (\w+) shapes in total", s):
        return len(left) + len(right) == NUM[m[1]]
    if s == "The left image contains more shapes than the right image":
        return len(left) > len(right)
    raise AssertionError(f"unparsed statement {sentence!r}")


def test_nlvr2_demo_layout_counts_and_true_statements(demo):
    root, man = demo
    part = man["nlvr2"]
    plan = demo_pairs.plan_nlvr2(3, {"train": 12, "dev": 4, "test1": 4})
    scenes = {f"{split}-{p['set_id']}-{p['pair_id']}": p for split, pairs in plan.items() for p in pairs}
    checked = jpeg = 0
    for split, exp in part["expected"].items():
        assert exp["annotations"] == f"nlvr2/nlvr2/data/{split}.json"
        items, skipped = read_nlvr2(str(root / exp["annotations"]), str(root / exp["image_root"]))
        assert (len(items), skipped) == (exp["items"], exp["skipped"])
        lines = {x["identifier"]: x for x in map(json.loads, (root / exp["annotations"]).read_text().splitlines())}
        assert all(("directory" in x) == (split == "train") for x in lines.values())
        assert all(("extra_validations" in x) == (split != "train") for x in lines.values())
        labels = Counter()
        for it in items:
            stem = it.identifier.rsplit("-", 1)[0]
            sub = f"images/train/{lines[it.identifier]['directory']}" if split == "train" else split
            assert (it.left, it.right) == (str(root / "nlvr2" / sub / f"{stem}-img0.png"),
                                           str(root / "nlvr2" / sub / f"{stem}-img1.png"))
            if stem not in scenes:   # the junk pair whose right image is not written
                assert not os.path.exists(it.right) and os.path.exists(it.left)
                continue
            p = scenes[stem]
            left, right = demo_pairs.scene_objects(p["left"]), demo_pairs.scene_objects(p["right"])
            assert it.label == nlvr2_truth(it.sentence, left, right), (it.identifier, it.sentence, left, right)
            labels[it.label] += 1
            for path, objs in ((it.left, left), (it.right, right)):
                assert painted_colors(path) == {o[1] for o in objs}, path
                jpeg += Image.open(path).format == "JPEG"
            checked += 1
        assert labels[0] == labels[1]   # one true and one false sentence per pair
    assert checked == 2 * (12 + 4 + 4) and jpeg > 0   # several images are JPEG bytes under .png, as in NLVR2
    # every statement the generator could have drawn for these pairs, not only the drawn ones
    for p in scenes.values():
        left, right = demo_pairs.scene_objects(p["left"]), demo_pairs.scene_objects(p["right"])
        for sentence, truth in demo_pairs.nlvr2_statements(p["left"], p["right"]):
            assert nlvr2_truth(sentence, left, right) == truth, (sentence, left, right)
    assert part["expected"]["train"]["load_skipped"] == {"missing_image": 1}


def snli_gold(hyp: str, desc: tuple) -> str:
    """The hypothesis' label about the scene, by a parse written here."""
    objs = demo_pairs.scene_objects(desc)
    s = hyp.rstrip(".")
    if m := re.fullmatch(r"There is an? (\w+) (\w+)", s):
        return "entailment" if (m[1], m[2]) in {(o[1], o[2]) for o in objs} else "contradiction"
    if m := re.fullmatch(r"There (?:is|are) (\w+) shapes? in the picture", s):
        return "entailment" if NUM[m[1]] == len(objs) else "contradiction"
    if m := re.fullmatch(r"A (small|large) (\w+) is in the picture", s):
        assert (m[1], m[2]) in {(o[0], o[2]) for o in objs}
        return "entailment"
    if s == "The picture is empty":
        return "contradiction"
    if m := re.fullmatch(r"The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)", s):
        a, rel, b = desc
        assert (m[1], m[2], m[4], m[5]) == (a[1], a[2], b[1], b[2])
        return "entailment" if m[3] == rel else "contradiction"
    if m := re.fullmatch(r"The (\w+) (\w+) (is made of \w+|is heavy|is brand new|was drawn by a child|"
                         r"is warm to the touch|is expensive|belongs to a teacher)", s):
        assert (m[1], m[2]) in {(o[1], o[2]) for o in objs}   # about an object the picture shows
        return "neutral"
    raise AssertionError(f"unparsed hypothesis {hyp!r}")


def test_snli_ve_demo_layout_counts_and_true_labels(demo):
    root, man = demo
    part = man["snli_ve"]
    plan = demo_pairs.plan_snli_ve(3, SMALL)
    scenes = {str(im["flickr_id"]): im["desc"] for split in ("train", "dev", "test") for im in plan[split]}
    for split, exp in part["expected"].items():
        items, skipped = read_snli_ve(str(root / exp["annotations"]), str(root / exp["image_root"]))
        assert (len(items), skipped) == (exp["items"], exp["skipped"])
        lines = [json.loads(x) for x in (root / exp["annotations"]).read_text().splitlines()]
        assert all(list(x) == sorted(x) for x in lines)   # keys sorted, as the release's generator writes them
        golds = Counter()
        for it in items:
            fid = os.path.basename(it.image)[:-4]
            if fid not in scenes:   # the hypothesis about an image that is not written
                assert split == "train" and not os.path.exists(it.image)
                continue
            gold = snli_gold(it.hypothesis, scenes[fid])
            assert LABELS[it.label] == gold, (it.hypothesis, scenes[fid])
            assert painted_colors(it.image) == {o[1] for o in demo_pairs.scene_objects(scenes[fid])}
            golds[gold] += 1
        assert golds == {g: SMALL[split] for g in LABELS}
    # every hypothesis the generator could have drawn for these scenes, not only the drawn ones
    for desc in scenes.values():
        for gold, hyps in demo_pairs.snli_ve_hypotheses(desc).items():
            assert hyps and all(snli_gold(h, desc) == gold for h in hyps), (gold, hyps, desc)


def test_task_sets_batch_pairs_and_skip_missing_images(demo, tok):
    from datasets.config import DataConfig
    from datasets.loader import BadSample
    from datasets.task_sets_pairs import Nlvr2Set, SnliVeSet

    root, man = demo
    cfg = DataConfig(image_size=32, max_text_len=16, num_workers=0)
    exp = man["nlvr2"]["expected"]["train"]
    items, _ = read_nlvr2(str(root / exp["annotations"]), str(root / exp["image_root"]))
    ds = Nlvr2Set(items, cfg, tok, train=False)
    good = [i for i, it in enumerate(items) if os.path.exists(it.right)]
    batch = ds.collate([ds.load(i, None) for i in good[:3]])
    assert batch["pixel_values"].shape == (3, 2, 1, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].tolist() == [items[i].label for i in good[:3]]
    assert batch["input_ids"].shape == (3, 16)
    # left and right are the two files, in that order
    single = SnliVeSet([], cfg, tok, train=False).read
    torch.testing.assert_close(batch["pixel_values"][0, 1], single(items[good[0]].right, "image", None))
    bad = next(i for i, it in enumerate(items) if not os.path.exists(it.right))
    with pytest.raises(BadSample, match="missing_image"):
        ds.load(bad, None)
    exp = man["snli_ve"]["expected"]["dev"]
    items, _ = read_snli_ve(str(root / exp["annotations"]), str(root / exp["image_root"]))
    batch = (s := SnliVeSet(items, cfg, tok, train=False)).collate([s.load(i, None) for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 3, 32, 32) and batch["labels"].tolist() == s.labels()[:4]
