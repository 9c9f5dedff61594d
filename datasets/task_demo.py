"""Deterministic demo fine-tuning sets in the real public layouts: COCO retrieval, MSRVTT 1k-A, VQAv2.

Scenes and clips are datasets/demo_data.py's coloured shapes (make_scene / make_clip, the same caption vocabulary);
the annotation files are written as the public releases lay them out, so the real readers read them:

  coco/images/{train2014,val2014,test2015}/COCO_<subset>_<id:012d>.jpg
  coco/dataset_coco.json                 Karpathy: {"images": [{filepath, filename, imgid, split, sentences, ...}],
                                         "dataset": "coco"}, splits train (train2014) / restval, val, test (val2014)
  coco/coco_{train,val,test}.json        ALBEF: train one caption per entry, val / test a caption list per image
  msrvtt/videos/video<N>.mp4
  msrvtt/MSRVTT_data.json                {"info", "videos": [{video_id, split, ...}], "sentences": [{caption,
                                         video_id, sen_id}]}
  msrvtt/MSRVTT_train.9k.csv             header video_id, one id a line
  msrvtt/MSRVTT_JSFUSION_test.csv        header key,vid_key,video_id,sentence, one caption per test video
  vqa/v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json, vqa/v2_mscoco_{train2014,val2014}_
  annotations.json                       the official VQAv2 layout over the coco/images files (10 answers each)
  manifest.json                          version, args, annotation paths, counts, the readers' expected results

Captions describe the scene (two phrasings per image: the demo caption and, for two objects, the same relation
told from the other object). Test captions are unique within the test split. VQA questions are asked about the
scene (colour, shape, count, existence, relation); 10 human answers each, most the right answer in varied spelling
("Red.", "two", "a circle"), 0-2 a wrong one, multiple_choice_answer the right one. Deliberate junk the readers
must skip (counted in manifest["expected"]): an ALBEF train entry with a blank caption, a Karpathy train image whose
file is not written, an MSRVTT train sentence with an empty caption, an MSRVTT train video whose mp4 is not
written, a VQA train question with an empty question string. The same seed gives byte-identical files.

    python datasets/task_demo.py --out data/demo_tasks [--seed 0] [--image-size 64] [--force]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make the repo root importable (our `datasets` package, not the HF one).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from datasets.demo_data import (COLORS, RELATIONS, SHAPES, _caption_of, _clip_space, _objects, _pair_space,
                                TreeWriter, _rng, encode_mp4, make_clip, make_scene)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2   # 2: nlvr2/, snli_ve/ (datasets/demo_pairs.py) and grounding/ (datasets/demo_grounding.py)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
assert set(INVERSE) == set(RELATIONS)

COCO, MSRVTT, VQA = "coco", "msrvtt", "vqa"
KARPATHY_FILE = f"{COCO}/dataset_coco.json"
ALBEF_FILES = {s: f"{COCO}/coco_{s}.json" for s in ("train", "val", "test")}
MSRVTT_DATA = f"{MSRVTT}/MSRVTT_data.json"
MSRVTT_TRAIN_CSV = f"{MSRVTT}/MSRVTT_train.9k.csv"
MSRVTT_TEST_CSV = f"{MSRVTT}/MSRVTT_JSFUSION_test.csv"
VQA_SUBTYPES = {"train": "train2014", "val": "val2014", "testdev": "test-dev2015"}
TESTDEV_IMAGES = "test2015"   # test-dev2015 questions are about COCO test2015 images (COCO_test2015_*.jpg)


@dataclass(frozen=True)
class TaskDemoArgs:
    seed: int = 0
    image_size: int = 64
    coco_train: int = 160       # Karpathy "train" images (train2014)
    coco_restval: int = 40      # Karpathy "restval" (val2014; trained on, as ALBEF's coco_train.json does)
    coco_val: int = 8
    coco_test: int = 64
    captions_per_image: int = 2
    msrvtt_train: int = 96
    msrvtt_test: int = 32
    video_frames: int = 8
    fps: int = 8
    vqa_train: int = 480        # questions over the train2014 images
    vqa_val: int = 128          # over the val2014 images
    vqa_testdev: int = 32       # over testdev_images test2015 images
    testdev_images: int = 12
    jpeg_quality: int = 90
    nlvr2_train: int = 100      # image pairs (two statements each) per NLVR2 split
    nlvr2_dev: int = 32
    nlvr2_test: int = 32
    snli_ve_train: int = 100    # images (one hypothesis per label each) per SNLI-VE split
    snli_ve_dev: int = 32
    snli_ve_test: int = 32
    grounding: bool = True      # the RefCOCO+-layout grounding set (fixed size: datasets/demo_grounding.py)


# ------------------------------------------------------------------------------------------------------- writing
def _json_bytes(obj) -> bytes:
    """Compact JSON as the releases ship it, keys in the order written (deterministic)."""
    return json.dumps(obj).encode()


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _jpeg(img, quality: int) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=quality)
    return b.getvalue()


# ------------------------------------------------------------------------------------------------------ captions
def _words(obj: tuple) -> str:
    return " ".join(obj)


def captions_of(desc: tuple, n: int) -> list[str]:
    """n (<= 2) descriptions of a scene: the demo caption, then the same scene told another way."""
    first = _caption_of(desc)
    if len(desc) == 1:
        second = f"a {_words(desc[0])} on a plain background"
    elif len(desc) == 3:
        a, r, b = desc
        second = _caption_of((b, INVERSE[r], a))
    else:   # a clip
        size, color, shape, direction = desc
        second = f"a {color} {shape} of {size} size moves {direction}"
    return [first, second][:n]


def _raw(caption: str, i: int) -> str:
    """COCO-style raw sentence: capitalised, a full stop, every third one with the trailing space COCO often has."""
    return caption[0].upper() + caption[1:] + "." + (" " if i % 3 == 2 else "")


def _tokens(raw: str) -> list[str]:
    return raw.lower().replace(".", " ").split()


# ---------------------------------------------------------------------------------------------------- the plan
def plan_coco(args: TaskDemoArgs) -> dict:
    """Scenes of every COCO image: test (distinct two-object scenes, no two telling the same scene), then
    val / restval / train / the missing Karpathy image / test2015, all distinct, none the test's or its inverse."""
    pairs = _pair_space()
    r = _rng(args.seed, 100)
    test, taken = [], set()
    for i in r.permutation(len(pairs)):
        d = pairs[int(i)]
        if d in taken:
            continue
        test.append(d)
        taken.update({d, (d[2], INVERSE[d[1]], d[0])})
        if len(test) == args.coco_test:
            break
    singles = [(o,) for o in _objects()]
    n_other = args.coco_train + args.coco_restval + args.coco_val + 1 + args.testdev_images
    pool_pairs = [pairs[int(i)] for i in r.permutation(len(pairs)) if pairs[int(i)] not in taken]
    pool_singles = [singles[int(i)] for i in r.permutation(len(singles))]
    other = []
    for _ in range(n_other):   # ~30% single objects, like the pretraining demo
        src = pool_singles if (r.random() < 0.3 and pool_singles) else pool_pairs
        other.append(src.pop())
    names = ["val"] * args.coco_val + ["restval"] * args.coco_restval + ["train"] * args.coco_train \
        + ["missing"] + ["test2015"] * args.testdev_images
    ids = [int(v) for v in _rng(args.seed, 101).choice(np.arange(1, 582_000), size=len(test) + n_other,
                                                        replace=False)]
    images = [{"split": "test", "desc": d} for d in test] + [{"split": s, "desc": d} for s, d in zip(names, other)]
    for im, cid in zip(images, ids):
        im["cocoid"] = cid
        im["subset"] = ("train2014" if im["split"] in ("train", "missing") else
                        TESTDEV_IMAGES if im["split"] == "test2015" else "val2014")
        im["filename"] = f"COCO_{im['subset']}_{cid:012d}.jpg"
    return {"images": images}


def plan_msrvtt(args: TaskDemoArgs) -> dict:
    clips = _clip_space()
    perm = [clips[int(i)] for i in _rng(args.seed, 200).permutation(len(clips))]
    n_train = args.msrvtt_train + 1   # + one listed video whose mp4 is not written
    if args.msrvtt_test + n_train > len(clips):
        raise ValueError(f"msrvtt_train + msrvtt_test must be below {len(clips)}, the distinct clip captions")
    r = _rng(args.seed, 201)
    train_ids = sorted(int(v) for v in r.choice(7010, size=n_train, replace=False))
    test_ids = [int(v) for v in r.choice(np.arange(7010, 10_000), size=args.msrvtt_test, replace=False)]
    missing = train_ids[int(r.integers(n_train))]
    videos = [{"video_id": f"video{n}", "split": "train", "desc": d, "written": n != missing}
              for n, d in zip(train_ids, perm[:n_train])]
    videos += [{"video_id": f"video{n}", "split": "test", "desc": d, "written": True}
               for n, d in zip(test_ids, perm[n_train:])]
    return {"videos": videos, "missing": f"video{missing}"}


# ------------------------------------------------------------------------------------------------------ COCO
def write_coco(files: TreeWriter, args: TaskDemoArgs, plan: dict) -> dict:
    """Images, dataset_coco.json and the ALBEF files; returns the scene metadata of every image by cocoid."""
    metas = {}
    for k, im in enumerate(plan["images"]):
        img, meta = make_scene(im["desc"], args.image_size, _rng(args.seed, 110, k))
        assert meta["caption"] == _caption_of(im["desc"])
        metas[im["cocoid"]] = meta
        if im["split"] != "missing":
            files.write(f"{COCO}/images/{im['subset']}/{im['filename']}", _jpeg(img, args.jpeg_quality))
    karpathy = [im for im in plan["images"] if im["split"] != "test2015"]
    order = [karpathy[int(i)] for i in _rng(args.seed, 120).permutation(len(karpathy))]
    entries, sentid = [], 0
    for imgid, im in enumerate(order):
        sents = []
        for j, cap in enumerate(captions_of(im["desc"], args.captions_per_image)):
            raw = _raw(cap, sentid)
            sents.append({"tokens": _tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        im["raw"] = [s["raw"] for s in sents]
        entries.append({"filepath": im["subset"], "sentids": [s["sentid"] for s in sents],
                        "filename": im["filename"], "imgid": imgid,
                        "split": "train" if im["split"] == "missing" else im["split"],
                        "sentences": sents, "cocoid": im["cocoid"]})
    files.write(KARPATHY_FILE, _json_bytes({"images": entries, "dataset": "coco"}))

    albef_train = []
    for im in order:
        if im["split"] in ("train", "restval"):
            for raw in im["raw"]:
                albef_train.append({"caption": raw, "image": f"{im['subset']}/{im['filename']}",
                                    "image_id": f"coco_{im['cocoid']}"})
    first = albef_train[0]
    albef_train.insert(5, {"caption": "  ", "image": first["image"], "image_id": first["image_id"]})   # junk
    files.write(ALBEF_FILES["train"], _json_bytes(albef_train))
    for split in ("val", "test"):
        files.write(ALBEF_FILES[split], _json_bytes([{"image": f"{im['subset']}/{im['filename']}",
                                                      "caption": im["raw"]} for im in order if im["split"] == split]))
    return metas


# ---------------------------------------------------------------------------------------------------- MSRVTT
def write_msrvtt(files: TreeWriter, args: TaskDemoArgs, plan: dict) -> None:
    videos = plan["videos"]
    for k, v in enumerate(videos):
        if v["written"]:
            frames, meta = make_clip(v["desc"], args.image_size, args.video_frames, _rng(args.seed, 210, k))
            assert meta["caption"] == _caption_of(v["desc"])
            files.write(f"{MSRVTT}/videos/{v['video_id']}.mp4", encode_mp4(frames, args.fps))
    r = _rng(args.seed, 220)
    by_number = sorted(videos, key=lambda v: int(v["video_id"][5:]))
    vids = []
    for v in by_number:
        start = round(float(r.uniform(0, 300)), 2)
        vids.append({"category": int(r.integers(20)), "url": f"https://example.com/demo/{v['video_id']}",
                     "video_id": v["video_id"], "start time": start,
                     "end time": round(start + args.video_frames / args.fps, 2), "split": v["split"],
                     "id": int(v["video_id"][5:])})
    sents = [(v["video_id"], c) for v in by_number for c in captions_of(v["desc"], args.captions_per_image)]
    sents = [sents[int(i)] for i in r.permutation(len(sents))]
    junk_at = next(i for i, (vid, _) in enumerate(sents)
                   if vid != plan["missing"] and any(v["video_id"] == vid and v["split"] == "train" for v in videos))
    sents.insert(junk_at, (sents[junk_at][0], ""))
    data = {"info": {"contributor": "datasets/task_demo.py", "data_created": "2016-04-01 00:00:00",
                     "description": "GLSCL demo clips in the MSR-VTT data layout (generated, not MSR-VTT)",
                     "version": "1.0", "year": "2016"},
            "videos": vids,
            "sentences": [{"caption": c, "video_id": vid, "sen_id": i} for i, (vid, c) in enumerate(sents)]}
    files.write(MSRVTT_DATA, _json_bytes(data))
    files.write(MSRVTT_TRAIN_CSV, _csv_bytes(["video_id"], [[v["video_id"]] for v in videos if v["split"] == "train"]))
    test = [v for v in videos if v["split"] == "test"]
    files.write(MSRVTT_TEST_CSV, _csv_bytes(["key", "vid_key", "video_id", "sentence"],
                                            [[f"ret{i}", f"msr{v['video_id'][5:]}", v["video_id"], _caption_of(v["desc"])]
                                             for i, v in enumerate(test)]))


# ------------------------------------------------------------------------------------------------------- VQA
def _variants(kind: str, answer: str) -> list[str]:
    """Other ways humans write the right answer (all equal to it after the official normalisation)."""
    cap = answer[0].upper() + answer[1:]
    out = [cap, answer + ".", cap + "."]
    if kind == "shape":
        out += [f"a {answer}", f"A {answer}."]
    if kind == "count":
        word = {"1": "one", "2": "two"}[answer]
        out += [word, word[0].upper() + word[1:], word + "."]
    if kind in ("exists", "relation"):
        out += [answer.upper(), answer + "!"]
    return out


def _wrong(kind: str, answer: str, r: np.random.Generator) -> str:
    pool = {"color": list(COLORS), "shape": list(SHAPES), "count": ["1", "2", "3"],
            "exists": ["yes", "no"], "relation": ["yes", "no"]}[kind]
    pool = [a for a in pool if a != answer]
    return pool[int(r.integers(len(pool)))]


def _kinds(meta: dict) -> list[str]:
    objs = meta["objects"]
    shapes = [o["shape"] for o in objs]
    colors = [o["color"] for o in objs]
    kinds = []
    if any(shapes.count(s) == 1 for s in shapes):
        kinds.append("color")
    if any(colors.count(c) == 1 for c in colors):
        kinds.append("shape")
    kinds += ["count", "exists"]
    if len(objs) == 2:
        kinds.append("relation")
    return kinds


def make_question(meta: dict, kind: str, r: np.random.Generator) -> dict:
    """{question, answer, answer_type, question_type} about a make_scene meta."""
    objs = meta["objects"]
    if kind == "color":
        cand = [o for o in objs if [p["shape"] for p in objs].count(o["shape"]) == 1]
        o = cand[int(r.integers(len(cand)))]
        return {"question": f"What color is the {o['shape']}?", "answer": o["color"], "answer_type": "other",
                "question_type": "what color is the"}
    if kind == "shape":
        cand = [o for o in objs if [p["color"] for p in objs].count(o["color"]) == 1]
        o = cand[int(r.integers(len(cand)))]
        return {"question": f"What shape is the {o['color']} object?", "answer": o["shape"], "answer_type": "other",
                "question_type": "what"}
    if kind == "count":
        return {"question": "How many shapes are there?", "answer": str(len(objs)), "answer_type": "number",
                "question_type": "how many"}
    if kind == "exists":
        present = {(o["color"], o["shape"]) for o in objs}
        if r.random() < 0.5:
            o = objs[int(r.integers(len(objs)))]
            color, shape, ans = o["color"], o["shape"], "yes"
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = absent[int(r.integers(len(absent)))]
            ans = "no"
        return {"question": f"Is there a {color} {shape}?", "answer": ans, "answer_type": "yes/no",
                "question_type": "is there a"}
    if kind == "relation":
        a, b = objs
        rel = meta["relation"]
        yes = r.random() < 0.5
        asked = rel if yes else INVERSE[rel]
        return {"question": f"Is the {a['size']} {a['color']} {a['shape']} {asked} the {b['size']} {b['color']} "
                            f"{b['shape']}?", "answer": "yes" if yes else "no", "answer_type": "yes/no",
                "question_type": "is the"}
    raise ValueError(f"unknown question kind {kind!r}")


def human_answers(kind: str, answer: str, r: np.random.Generator) -> list[dict]:
    """10 answers: the right one (70% as is, else a variant spelling), 0-2 of them replaced by a wrong one."""
    variants = _variants(kind, answer)
    texts = [answer if r.random() < 0.7 else variants[int(r.integers(len(variants)))] for _ in range(10)]
    n_wrong = int(r.choice(3, p=[0.5, 0.3, 0.2]))
    wrong_at = set(int(i) for i in r.choice(10, size=n_wrong, replace=False))
    out = []
    for i in range(10):
        if i in wrong_at:
            w = _wrong(kind, answer, r)
            out.append({"answer": w if r.random() < 0.7 else w[0].upper() + w[1:], "answer_confidence": "maybe",
                        "answer_id": i + 1})
        else:
            out.append({"answer": texts[i], "answer_confidence": "yes", "answer_id": i + 1})
    return out


def _vqa_header(subtype: str) -> dict:
    return {"info": {"description": "GLSCL demo questions about coloured-shape scenes in the VQA v2 layout "
                                    "(generated, not VQA data)", "url": "", "version": "2.0", "year": 2017,
                     "contributor": "datasets/task_demo.py", "date_created": "2017-04-26 00:00:00"},
            "license": {"url": "", "name": "generated demo data"}, "data_subtype": subtype}


def write_vqa(files: TreeWriter, args: TaskDemoArgs, plan: dict, metas: dict) -> dict:
    groups = {"train": [im for im in plan["images"] if im["split"] == "train"],
              "val": [im for im in plan["images"] if im["split"] in ("restval", "val", "test")],
              "testdev": [im for im in plan["images"] if im["split"] == "test2015"]}
    counts = {"train": args.vqa_train, "val": args.vqa_val, "testdev": args.vqa_testdev}
    junk = {}
    for g, (name, ims) in enumerate(groups.items()):
        subtype, n = VQA_SUBTYPES[name], counts[name]
        ims = [ims[int(i)] for i in _rng(args.seed, 300, g).permutation(len(ims))]
        if n > 3 * len(ims):
            raise ValueError(f"vqa_{name}={n}: at most 3 questions per image ({len(ims)} images)")
        kinds = {im["cocoid"]: [_kinds(metas[im["cocoid"]])[int(i)] for i in
                                _rng(args.seed, 301, im["cocoid"]).permutation(len(_kinds(metas[im["cocoid"]])))]
                 for im in ims}
        questions, annotations = [], []
        for q in range(n):
            im, k = ims[q % len(ims)], q // len(ims)
            r = _rng(args.seed, 310 + g, q)
            qa = make_question(metas[im["cocoid"]], kinds[im["cocoid"]][k], r)
            qid = im["cocoid"] * 1000 + k
            questions.append({"image_id": im["cocoid"], "question": qa["question"], "question_id": qid})
            annotations.append({"question_type": qa["question_type"], "multiple_choice_answer": qa["answer"],
                                "answers": human_answers(kinds[im["cocoid"]][k], qa["answer"], r),
                                "image_id": im["cocoid"], "answer_type": qa["answer_type"], "question_id": qid})
        if name == "train" and questions:   # junk: an empty question (its annotation stays)
            at = min(7, len(questions) - 1)
            questions[at]["question"] = ""
            junk[name] = questions[at]["question_id"]
        qfile = f"{VQA}/v2_OpenEnded_mscoco_{subtype}_questions.json"
        files.write(qfile, _json_bytes({**_vqa_header(subtype), "task_type": "Open-Ended", "data_type": "mscoco",
                                        "questions": questions}))
        if name != "testdev":
            afile = f"{VQA}/v2_mscoco_{subtype}_annotations.json"
            head = _vqa_header(subtype)
            files.write(afile, _json_bytes({"info": head["info"], "license": head["license"],
                                            "data_subtype": subtype, "annotations": annotations,
                                            "data_type": "mscoco"}))
    return junk


# ------------------------------------------------------------------------------------------------------ manifest
def _expected(args: TaskDemoArgs) -> dict:
    """What the readers give on this set: datasets.retrieval.read_retrieval and datasets.vqa.read_vqa arguments
    (paths relative to the demo dir) with their media / text / item counts and skip counts."""
    cpi = args.captions_per_image
    n_trainval = args.coco_train + args.coco_restval
    coco = {"media_root": f"{COCO}/images", "modality": "image"}
    msr = {"media_root": f"{MSRVTT}/videos", "modality": "video"}
    return {
        "coco_karpathy_train": {"format": "karpathy", "annotations": [KARPATHY_FILE], "split": ["train", "restval"],
                                **coco, "media": n_trainval, "texts": n_trainval * cpi,
                                "skipped": {"missing_media": 1}},
        "coco_karpathy_val": {"format": "karpathy", "annotations": [KARPATHY_FILE], "split": ["val"], **coco,
                              "media": args.coco_val, "texts": args.coco_val * cpi, "skipped": {}},
        "coco_karpathy_test": {"format": "karpathy", "annotations": [KARPATHY_FILE], "split": ["test"], **coco,
                               "media": args.coco_test, "texts": args.coco_test * cpi, "skipped": {}},
        "coco_albef_train": {"format": "albef", "annotations": [ALBEF_FILES["train"]], "split": None, **coco,
                             "media": n_trainval, "texts": n_trainval * cpi, "skipped": {"empty_caption": 1}},
        "coco_albef_val": {"format": "albef", "annotations": [ALBEF_FILES["val"]], "split": None, **coco,
                           "media": args.coco_val, "texts": args.coco_val * cpi, "skipped": {}},
        "coco_albef_test": {"format": "albef", "annotations": [ALBEF_FILES["test"]], "split": None, **coco,
                            "media": args.coco_test, "texts": args.coco_test * cpi, "skipped": {}},
        "msrvtt_train": {"format": "msrvtt", "annotations": [MSRVTT_DATA, MSRVTT_TRAIN_CSV], "split": None, **msr,
                         "media": args.msrvtt_train, "texts": args.msrvtt_train * cpi,
                         "skipped": {"empty_caption": 1, "missing_media": 1}},
        "msrvtt_test": {"format": "msrvtt", "annotations": [MSRVTT_TEST_CSV], "split": None, **msr,
                        "media": args.msrvtt_test, "texts": args.msrvtt_test, "skipped": {}},
        "vqa_train": {"questions": f"{VQA}/v2_OpenEnded_mscoco_train2014_questions.json",
                      "annotations": f"{VQA}/v2_mscoco_train2014_annotations.json",
                      "image_root": f"{COCO}/images/train2014", "items": args.vqa_train - 1,
                      "skipped": {"empty_question": 1}},
        "vqa_val": {"questions": f"{VQA}/v2_OpenEnded_mscoco_val2014_questions.json",
                    "annotations": f"{VQA}/v2_mscoco_val2014_annotations.json",
                    "image_root": f"{COCO}/images/val2014", "items": args.vqa_val, "skipped": {}},
        "vqa_testdev": {"questions": f"{VQA}/v2_OpenEnded_mscoco_test-dev2015_questions.json", "annotations": None,
                        "image_root": f"{COCO}/images/{TESTDEV_IMAGES}", "items": args.vqa_testdev, "skipped": {},
                        "image_pattern": "COCO_test2015_{image_id:012d}.jpg"},
    }


def _annotation_files() -> dict:
    out = {"coco_karpathy": KARPATHY_FILE, **{f"coco_albef_{s}": p for s, p in ALBEF_FILES.items()},
           "msrvtt_data": MSRVTT_DATA, "msrvtt_train_csv": MSRVTT_TRAIN_CSV, "msrvtt_test_csv": MSRVTT_TEST_CSV}
    for name, subtype in VQA_SUBTYPES.items():
        out[f"vqa_{name}_questions"] = f"{VQA}/v2_OpenEnded_mscoco_{subtype}_questions.json"
        if name != "testdev":
            out[f"vqa_{name}_annotations"] = f"{VQA}/v2_mscoco_{subtype}_annotations.json"
    return out


def _check_args(args: TaskDemoArgs) -> None:
    if args.image_size % 2 or args.image_size < 16:
        raise ValueError(f"image_size must be even and >= 16 (libx264 needs even sizes), got {args.image_size}")
    if not 1 <= args.captions_per_image <= 2:
        raise ValueError(f"captions_per_image must be 1 or 2, got {args.captions_per_image}")
    small = [f for f in ("coco_train", "coco_restval", "coco_val", "coco_test", "msrvtt_train", "msrvtt_test",
                         "vqa_train", "vqa_val", "vqa_testdev", "testdev_images", "video_frames", "fps")
             if getattr(args, f) < 1]
    if small:
        raise ValueError(f"{small[0]} must be >= 1, got {getattr(args, small[0])}")
    if args.coco_test > 2000:
        raise ValueError(f"coco_test={args.coco_test}: at most 2000 distinct two-object test scenes")


def _manifest_ok(out: Path, args: TaskDemoArgs) -> dict | None:
    try:
        man = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or man.get("version") != FORMAT_VERSION \
            or man.get("args") != json.loads(json.dumps(asdict(args))):
        return None
    for rel, size in man.get("files", {}).items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return man


def _clean_stale(out: Path) -> None:
    """Files an earlier run with other arguments wrote (other ids) would match no manifest: remove ours only."""
    for sub, pattern in ((f"{COCO}/images/train2014", "COCO_train2014_*.jpg"),
                         (f"{COCO}/images/val2014", "COCO_val2014_*.jpg"),
                         (f"{COCO}/images/{TESTDEV_IMAGES}", f"COCO_{TESTDEV_IMAGES}_*.jpg"),
                         (f"{MSRVTT}/videos", "video*.mp4")):
        d = out / sub
        for p in sorted(d.glob(pattern)) + sorted(d.glob(pattern + ".tmp")) if d.is_dir() else []:
            p.unlink()


def generate(out_dir: str | os.PathLike, *, force: bool = False, verbose: bool = False, **kw) -> dict:
    """Write the demo task sets into out_dir (kwargs are TaskDemoArgs fields) and return the manifest, with
    `root` (out_dir) and `reused` added. Idempotent: a complete set made with the same arguments is kept as is."""
    args = TaskDemoArgs(**kw)
    _check_args(args)
    out = Path(out_dir)
    if not force:
        man = _manifest_ok(out, args)
        if man is not None:
            return {**man, "root": str(out), "reused": True}
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    _clean_stale(out)
    files = TreeWriter(out)
    coco_plan, msrvtt_plan = plan_coco(args), plan_msrvtt(args)
    metas = write_coco(files, args, coco_plan)
    if verbose:
        print(f"  coco: {sum(im['split'] != 'missing' for im in coco_plan['images'])} images", flush=True)
    write_msrvtt(files, args, msrvtt_plan)
    if verbose:
        print(f"  msrvtt: {sum(v['written'] for v in msrvtt_plan['videos'])} clips", flush=True)
    vqa_junk = write_vqa(files, args, coco_plan, metas)
    if verbose:
        print(f"  vqa: {args.vqa_train} / {args.vqa_val} / {args.vqa_testdev} questions", flush=True)
    from datasets.demo_grounding import write_grounding
    from datasets.demo_pairs import write_pairs
    parts = write_pairs(out, args, args.seed, **{f"{t}_{sp}": getattr(args, f"{t}_{sp}") for t in ("nlvr2", "snli_ve")
                                                for sp in ("train", "dev", "test")})
    if args.grounding:
        parts["grounding"] = write_grounding(out, args.seed, args.image_size)
    if verbose:
        print(f"  nlvr2, snli_ve{', grounding' if args.grounding else ''}", flush=True)
    for part in parts.values():
        files.sizes.update(part.pop("files"))
    missing_img = next(im for im in coco_plan["images"] if im["split"] == "missing")
    man = {
        "version": FORMAT_VERSION,
        "args": json.loads(json.dumps(asdict(args))),
        "annotations": _annotation_files(),
        "media_roots": {"coco": f"{COCO}/images", "msrvtt": f"{MSRVTT}/videos",
                        "vqa_train": f"{COCO}/images/train2014", "vqa_val": f"{COCO}/images/val2014",
                        "vqa_testdev": f"{COCO}/images/{TESTDEV_IMAGES}"},
        "counts": {
            "coco_images": {s: sum(im["split"] == s for im in coco_plan["images"])
                            for s in ("train", "restval", "val", "test", "test2015")},
            "captions_per_image": args.captions_per_image,
            "msrvtt_videos": {s: sum(v["split"] == s and v["written"] for v in msrvtt_plan["videos"])
                              for s in ("train", "test")},
            "vqa_questions": {"train": args.vqa_train, "val": args.vqa_val, "testdev": args.vqa_testdev},
        },
        "junk": {
            "coco_albef_train": "one entry with a blank caption",
            "coco_karpathy_train": f"{COCO}/images/train2014/{missing_img['filename']} is listed (split train) "
                                   "but not written",
            "msrvtt_train": f"one sentence with an empty caption; {msrvtt_plan['missing']} is listed but its mp4 "
                            "is not written",
            "vqa_train": f"question {vqa_junk.get('train')} has an empty question string",
        },
        "expected": _expected(args),
        **parts,   # nlvr2 / snli_ve / grounding: each its annotations, counts, junk and expected reader counts
        "files": dict(sorted(files.sizes.items())),
    }
    files.write(MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode())
    return {**man, "root": str(out), "reused": False, "seconds": round(time.time() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TaskDemoArgs()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--force", action="store_true", help="regenerate even when a matching set exists")
    a = ap.parse_args(argv)
    man = generate(a.out, force=a.force, verbose=True, seed=a.seed, image_size=a.image_size)
    state = "already complete, nothing to do" if man["reused"] else f"written in {man['seconds']} s"
    total = sum(man["files"].values())
    print(f"demo task sets in {a.out}: {state} ({len(man['files'])} files, {total / 1e6:.1f} MB)")
    for name, rel in man["annotations"].items():
        print(f"  {name}: {os.path.join(a.out, rel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
