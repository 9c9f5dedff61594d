"""Demo fine-tuning sets (datasets/task_demo.py): byte-identical per seed, readable by the real-layout readers with the
manifest's skip counts, captions and VQA answers that are true of the scenes, the official VQAv2 JSON layout."""
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datasets import task_demo
from datasets.demo_data import COLORS, RELATIONS, SHAPES
from datasets.retrieval import read_retrieval

from datasets.task_demo import TaskDemoArgs  # noqa: E402

A = TaskDemoArgs()   # the counts a default generation writes


def tree_hash(root) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_demo")
    man = task_demo.generate(root)
    return root, man


def load(root, rel):
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


def read(root, e):
    return read_retrieval(e["format"], [os.path.join(root, a) for a in e["annotations"]],
                          os.path.join(root, e["media_root"]), e["split"], e["modality"])


def by_name(rs) -> dict:
    return {os.path.basename(m): sorted(rs.texts[t] for t in ts) for m, ts in zip(rs.media, rs.media2txt)}


def test_same_seed_same_bytes_and_reuse(demo, tmp_path):
    root, man = demo
    assert not man["reused"]
    first = tree_hash(root)
    assert len(first) == len(man["files"]) + 1                    # every file listed, plus the manifest
    again = task_demo.generate(tmp_path / "b")
    assert tree_hash(tmp_path / "b") == first
    assert again["files"] == man["files"]
    assert task_demo.generate(tmp_path / "b")["reused"]
    assert task_demo.generate(tmp_path / "b", force=True)["reused"] is False
    assert tree_hash(tmp_path / "b") == first
    other = task_demo.generate(tmp_path / "c", seed=1)
    assert other["files"].keys() != man["files"].keys()           # other COCO ids / video ids


def test_command_line_in_a_fresh_process_gives_the_same_bytes(demo, tmp_path):
    root, _ = demo
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(repo, "datasets", "task_demo.py"), "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert tree_hash(tmp_path / "cli") == tree_hash(root)
    r = subprocess.run([sys.executable, os.path.join(repo, "datasets", "task_demo.py"), "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "already complete" in r.stdout


def test_manifest_lists_every_annotation_file(demo):
    root, man = demo
    assert man["version"] == task_demo.FORMAT_VERSION and man["args"]["seed"] == 0
    names = {os.path.basename(p) for p in man["annotations"].values()}
    assert names == {"dataset_coco.json", "coco_train.json", "coco_val.json", "coco_test.json", "MSRVTT_data.json",
                     "MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv",
                     "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
                     "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                     "v2_OpenEnded_mscoco_test-dev2015_questions.json"}
    for rel in man["annotations"].values():
        assert rel in man["files"] and os.path.isfile(os.path.join(root, rel))
    assert sorted(man["counts"]) == ["captions_per_image", "coco_images", "msrvtt_videos", "vqa_questions"]
    # the sizes the brief asked for (defaults), counted here from the image / video files themselves
    jpgs = Counter(rel.split("/")[2] for rel in man["files"] if rel.startswith("coco/") and rel.endswith(".jpg"))
    assert jpgs == {"train2014": A.coco_train, "val2014": A.coco_restval + A.coco_val + A.coco_test,
                    "test2015": A.testdev_images}
    assert sum(rel.endswith(".mp4") for rel in man["files"]) == A.msrvtt_train + A.msrvtt_test
    for part, top in (("nlvr2", "nlvr2/"), ("snli_ve", "snli_ve/"), ("grounding", "grounding/")):   # the other writers
        assert part in man and any(rel.startswith(top) for rel in man["files"]), part


def test_readers_read_the_demo_with_the_expected_skips(demo):
    root, man = demo
    for name, e in man["expected"].items():
        if "format" not in e:
            continue
        rs = read(root, e)
        assert (len(rs.media), len(rs.texts), rs.skipped) == (e["media"], e["texts"], e["skipped"]), name
        assert all(os.path.isfile(m) for m in rs.media)
    # numbers stated in the brief, independent of the manifest
    exp = man["expected"]
    assert (exp["coco_karpathy_train"]["media"], exp["coco_karpathy_test"]["media"]) == (A.coco_train + A.coco_restval,
                                                                                      A.coco_test)
    assert exp["coco_karpathy_train"]["skipped"] == {"missing_media": 1}
    assert exp["coco_albef_train"]["skipped"] == {"empty_caption": 1}
    assert exp["msrvtt_train"]["skipped"] == {"empty_caption": 1, "missing_media": 1}
    assert exp["vqa_train"]["skipped"] == {"empty_question": 1}


def test_coco_layouts_agree_and_captions_describe_the_scene(demo):
    root, man = demo
    exp = man["expected"]
    for split in ("train", "val", "test"):
        k, a = read(root, exp[f"coco_karpathy_{split}"]), read(root, exp[f"coco_albef_{split}"])
        assert by_name(k) == by_name(a), split
        assert all(len(ts) == 2 for ts in k.media2txt)
        prefix = {"train": None, "val": "COCO_val2014_", "test": "COCO_val2014_"}[split]
        if prefix:
            assert all(os.path.basename(m).startswith(prefix) for m in k.media)
    test = read(root, exp["coco_karpathy_test"])
    assert len(set(test.texts)) == len(test.texts) == A.coco_test * A.captions_per_image            # unique test captions
    karpathy = load(root, man["annotations"]["coco_karpathy"])
    assert {im["split"] for im in karpathy["images"]} == {"train", "restval", "val", "test"}
    assert {im["filepath"] for im in karpathy["images"]} == {"train2014", "val2014"}
    for im in karpathy["images"]:
        assert re.fullmatch(rf"COCO_{im['filepath']}_\d{{12}}\.jpg", im["filename"])
        assert int(im["filename"][-16:-4]) == im["cocoid"]
        assert [s["sentid"] for s in im["sentences"]] == im["sentids"]
    # the colour words of a caption are the colours painted in its image
    anchors = np.array(list(COLORS.values()), float)
    for m, ts in list(zip(test.media, test.media2txt))[:8]:
        px = np.asarray(Image.open(m).convert("RGB"), float).reshape(-1, 3)
        assert Image.open(m).size == (64, 64)
        d = ((px[:, None] - anchors[None]) ** 2).sum(-1)
        near = Counter(np.argmin(d, 1)[d.min(1) < 40 ** 2].tolist())
        painted = {list(COLORS)[i] for i, n in near.items() if n >= 12}
        named = {w.strip(".") for w in test.texts[ts[0]].lower().split()} & set(COLORS)
        assert named <= painted, (m, test.texts[ts[0]], painted)


def test_msrvtt_train_and_test(demo):
    root, man = demo
    exp = man["expected"]
    train, test = read(root, exp["msrvtt_train"]), read(root, exp["msrvtt_test"])
    assert (len(train.media), len(test.media)) == (A.msrvtt_train, A.msrvtt_test)
    assert not set(train.media) & set(test.media)
    assert all(re.fullmatch(r"video\d+\.mp4", os.path.basename(m)) for m in train.media + test.media)
    assert len(set(test.texts)) == A.msrvtt_test and test.media2txt == [[i] for i in range(A.msrvtt_test)]
    data = load(root, man["annotations"]["msrvtt_data"])
    sents = {}
    for s in data["sentences"]:
        assert set(s) == {"caption", "video_id", "sen_id"}
        sents.setdefault(s["video_id"], []).append(s["caption"])
    for m, ts in zip(test.media, test.media2txt):                    # the JSFUSION caption is one of the json's
        assert test.texts[ts[0]] in sents[os.path.basename(m)[:-4]]
    split = {v["video_id"]: v["split"] for v in data["videos"]}
    assert {split[os.path.basename(m)[:-4]] for m in train.media} == {"train"}
    with open(os.path.join(root, man["annotations"]["msrvtt_test_csv"])) as f:
        assert f.readline() == "key,vid_key,video_id,sentence\n"
    with open(os.path.join(root, man["annotations"]["msrvtt_train_csv"])) as f:
        assert f.readline() == "video_id\n"
    import av
    with av.open(test.media[0]) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)


def _normalise(ans: str) -> str:
    """Enough of the official answer processing for the demo's spellings (lower case, . ! dropped, number words)."""
    words = ans.lower().replace(".", " ").replace("!", " ").split()
    words = [{"one": "1", "two": "2", "three": "3"}.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def test_vqa_official_layout_and_true_answers(demo):
    root, man = demo
    ann = man["annotations"]
    karpathy = load(root, ann["coco_karpathy"])
    caption = {im["cocoid"]: im["sentences"][0]["raw"].lower().rstrip(". ") for im in karpathy["images"]}
    spellings = Counter()
    for split, subtype, n in (("train", "train2014", A.vqa_train), ("val", "val2014", A.vqa_val),
                                 ("testdev", "test-dev2015", A.vqa_testdev)):
        q = load(root, ann[f"vqa_{split}_questions"])
        assert {"info", "license", "data_subtype", "task_type", "data_type", "questions"} <= set(q)
        assert q["data_subtype"] == subtype and q["task_type"] == "Open-Ended" and q["data_type"] == "mscoco"
        assert len(q["questions"]) == n
        image_dir = "test2015" if split == "testdev" else subtype
        for x in q["questions"]:
            assert set(x) == {"image_id", "question", "question_id"}
            assert x["question_id"] // 1000 == x["image_id"] and x["question_id"] % 1000 < 3
            assert os.path.isfile(os.path.join(root, "coco/images", image_dir,
                                               f"COCO_{image_dir}_{x['image_id']:012d}.jpg"))
        assert len({x["question_id"] for x in q["questions"]}) == n
        if split == "testdev":
            assert f"vqa_{split}_annotations" not in ann
            continue
        a = load(root, ann[f"vqa_{split}_annotations"])
        assert {"info", "license", "data_subtype", "data_type", "annotations"} <= set(a)
        assert [x["question_id"] for x in a["annotations"]] == [x["question_id"] for x in q["questions"]]
        empty = 0
        for x, y in zip(q["questions"], a["annotations"]):
            assert set(y) == {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                              "question_id"}
            assert y["image_id"] == x["image_id"] and y["answer_type"] in ("yes/no", "number", "other")
            assert [z["answer_id"] for z in y["answers"]] == list(range(1, 11))
            votes = Counter(_normalise(z["answer"]) for z in y["answers"])
            assert votes.most_common(1)[0][0] == y["multiple_choice_answer"] and votes[y["multiple_choice_answer"]] >= 8
            spellings.update(z["answer"] for z in y["answers"] if z["answer"] != _normalise(z["answer"]))
            if not x["question"]:
                empty += 1
                continue
            cap, mc, text = caption[x["image_id"]], y["multiple_choice_answer"], x["question"]
            if text == "How many shapes are there?":
                assert mc == ("2" if any(f" {r} " in cap for r in RELATIONS) else "1") and y["answer_type"] == "number"
            elif m := re.fullmatch(r"What color is the (\w+)\?", text):
                assert f"{mc} {m[1]}" in cap and y["answer_type"] == "other"
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", text):
                assert mc in SHAPES and f"{m[1]} {mc}" in cap
            elif m := re.fullmatch(r"Is there a (\w+ \w+)\?", text):
                assert mc == ("yes" if m[1] in cap else "no") and y["answer_type"] == "yes/no"
            else:
                m = re.fullmatch(r"Is the (.+?) (left of|right of|above|below) the (.+)\?", text)
                assert m, text
                assert mc == ("yes" if f"{m[1]} {m[2]} a {m[3]}" in cap or
                              f"{m[3]} {task_demo.INVERSE[m[2]]} a {m[1]}" in cap else "no")
        assert empty == (1 if split == "train" else 0)
    assert spellings                       # some humans write "Red." / "two" / "a circle": normalisation matters
    assert any(s[0].isupper() for s in spellings) and any(s.endswith(".") for s in spellings)


def test_vqa_reader_reads_the_demo(demo):
    from datasets.vqa import read_vqa
    root, man = demo
    for name in ("vqa_train", "vqa_val", "vqa_testdev"):
        e = man["expected"][name]
        kw = {"image_pattern": e["image_pattern"]} if "image_pattern" in e else {}
        items, skipped = read_vqa(os.path.join(root, e["questions"]),
                                  e["annotations"] and os.path.join(root, e["annotations"]),
                                  os.path.join(root, e["image_root"]), **kw)
        assert (len(items), skipped) == (e["items"], e["skipped"]), name
        assert all(os.path.isfile(it.image) for it in items)
