"""Deterministic demo sets for the pair / entailment tasks in their real layouts: NLVR2 and SNLI-VE.

Scenes are datasets/demo_data.py's coloured shapes (make_scene: one object, or two in a spatial relation); the text
is about what the scene metadata says, so every label is known:

  nlvr2/nlvr2/data/{train,dev,test1}.json     lil-lab/nlvr's JSON lines (validation, sentence, left_url, writer,
                                              label "True"/"False", right_url, synset, query, identifier
                                              "split-set-pair-sentence", extra_validations (dev / test1),
                                              directory (train))
  nlvr2/images/train/<directory>/<stem>-img{0,1}.png, nlvr2/dev/<stem>-img{0,1}.png, nlvr2/test1/...
                                              (ViLT's DATA.md layout; every fourth image is JPEG bytes under its
                                              .png name, as several real NLVR2 images are)
  snli_ve/snli_ve_{train,dev,test}.jsonl      SNLI-VE's JSON lines, keys sorted as its generator writes them
                                              (Flickr30K_ID, annotator_labels, captionID, gold_label, pairID,
                                              sentence1 = a caption of the scene, sentence2 = the hypothesis, ...)
  snli_ve/flickr30k-images/<Flickr30K_ID>.jpg

NLVR2: each image pair gets two sentences, one true and one false, from templates about the pair ("The left image
contains a red circle.", "Both images contain a square.", "Exactly one image contains a blue object.", "There
are three shapes in total.", "The left image contains more shapes than the right image.", "Neither image contains
a green object."). SNLI-VE: each image gets one hypothesis per label: entailed (an object, the count, or the
relation the scene shows), contradicted (an absent object, a wrong count, the inverse relation, an empty picture),
neutral (something a picture cannot show about an object it does show: its material, weight, age, maker).
Deliberate junk in the train splits, counted in `expected`: NLVR2 a line with an empty sentence, a line with
label "maybe", a listed pair whose right image is not written; SNLI-VE a line with gold_label "-", a line with an
empty hypothesis, a hypothesis about an image that is not written. The same seed gives byte-identical files.

    write_pairs(out_dir, args, seed) -> {"nlvr2": manifest part, "snli_ve": manifest part}
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from datasets.demo_data import (COLORS, RELATIONS, SHAPES, _caption_of, _objects, _pair_space, _rng,
                                TreeWriter, make_scene)

NLVR2_DIR, SNLI_DIR = "nlvr2", "snli_ve"
NLVR2_SPLITS = {"train": ("train", "images/train"), "dev": ("dev", "dev"), "test1": ("test1", "test1")}
SNLI_SPLITS = ("train", "dev", "test")
SNLI_IMAGES = f"{SNLI_DIR}/flickr30k-images"
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}
NEUTRAL_PHRASES = ("is made of wood", "is made of glass", "is heavy", "is brand new", "was drawn by a child",
                   "is warm to the touch", "is expensive", "belongs to a teacher")
assert set(INVERSE) == set(RELATIONS)


def nlvr2_paths() -> dict:
    """Annotation files and image roots, relative to the output directory, by split."""
    return {s: {"annotations": f"{NLVR2_DIR}/nlvr2/data/{name}.json", "image_root": f"{NLVR2_DIR}/{root}"}
            for s, (name, root) in NLVR2_SPLITS.items()}


def snli_ve_paths() -> dict:
    return {s: {"annotations": f"{SNLI_DIR}/snli_ve_{s}.jsonl", "image_root": SNLI_IMAGES} for s in SNLI_SPLITS}


# ------------------------------------------------------------------------------------------------------- scenes
def _scene_descs(r: np.random.Generator, n: int) -> list[tuple]:
    """n scene descriptions, ~35% one object, the rest two related objects."""
    singles, pairs = [(o,) for o in _objects()], _pair_space()
    return [singles[int(r.integers(len(singles)))] if r.random() < 0.35 else pairs[int(r.integers(len(pairs)))]
            for _ in range(n)]


def scene_objects(desc: tuple) -> list[tuple]:
    """(size, color, shape) of each object of a make_scene description."""
    return [desc[0]] if len(desc) == 1 else [desc[0], desc[2]]


def _image_bytes(desc: tuple, args, r: np.random.Generator, fmt: str) -> bytes:
    img, meta = make_scene(desc, int(getattr(args, "image_size", 64)), r)
    assert meta["caption"] == _caption_of(desc)
    b = io.BytesIO()
    if fmt == "PNG":
        img.save(b, format="PNG", optimize=False)
    else:
        img.save(b, format="JPEG", quality=int(getattr(args, "jpeg_quality", 90)))
    return b.getvalue()


# ------------------------------------------------------------------------------------------------------- NLVR2
def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def nlvr2_statements(left: tuple, right: tuple) -> list[tuple[str, bool]]:
    """Every templated sentence about the pair (left, right scene descriptions) with its truth."""
    lo, ro = scene_objects(left), scene_objects(right)
    has = lambda objs, c, s: any(o[1] == c and o[2] == s for o in objs)   # noqa: E731
    colors = lambda objs: {o[1] for o in objs}                          # noqa: E731
    shapes = lambda objs: {o[2] for o in objs}                          # noqa: E731
    out = []
    for c in COLORS:
        for s in SHAPES:
            out.append((f"The left image contains {_a(c)} {s}.", has(lo, c, s)))
            out.append((f"The right image contains {_a(c)} {s}.", has(ro, c, s)))
        out.append((f"Exactly one image contains {_a(c)} object.", (c in colors(lo)) != (c in colors(ro))))
        out.append((f"Neither image contains {_a(c)} object.", c not in colors(lo) | colors(ro)))
    for s in SHAPES:
        out.append((f"Both images contain {_a(s)}.", s in shapes(lo) and s in shapes(ro)))
    for n in (2, 3, 4):
        out.append((f"There are {NUMBER[n]} shapes in total.", len(lo) + len(ro) == n))
    out.append(("The left image contains more shapes than the right image.", len(lo) > len(ro)))
    return out


def _template(sentence: str) -> str:
    """The template a statement came from (its words without colours, shapes and numbers)."""
    drop = set(COLORS) | set(SHAPES) | set(NUMBER.values()) | {"a", "an"}
    return " ".join(w for w in sentence.rstrip(".").split() if w not in drop)


def _pick(cands: list[tuple[str, bool]], truth: bool, r: np.random.Generator) -> str:
    """A sentence of the wanted truth: a template drawn uniformly among those that have one, then a sentence."""
    by_t: dict[str, list[str]] = {}
    for s, t in cands:
        if t == truth:
            by_t.setdefault(_template(s), []).append(s)
    keys = sorted(by_t)
    options = by_t[keys[int(r.integers(len(keys)))]]
    return options[int(r.integers(len(options)))]


def plan_nlvr2(seed: int, counts: dict[str, int]) -> dict[str, list[dict]]:
    """Per split, the image pairs: {set_id, pair_id, directory (train), left, right (scene descriptions),
    sentences [(sentence_id, text, truth)]} (one true and one false sentence each)."""
    plan = {}
    for k, split in enumerate(NLVR2_SPLITS):
        n = counts[split]
        r = _rng(seed, 400, k)
        descs = _scene_descs(r, 2 * n)
        set_ids = sorted(int(v) for v in r.choice(10_000 if split == "train" else 1_000, size=n, replace=False))
        pairs = []
        for j in range(n):
            left, right = descs[2 * j], descs[2 * j + 1]
            cands = nlvr2_statements(left, right)
            first = bool(r.random() < 0.5)
            texts = [_pick(cands, first, r), _pick(cands, not first, r)]
            pair = {"set_id": set_ids[j], "pair_id": int(r.integers(4)), "left": left, "right": right,
                    "sentences": [(0, texts[0], first), (1, texts[1], not first)]}
            if split == "train":
                pair["directory"] = set_ids[j] % 10
            pairs.append(pair)
        plan[split] = pairs
    return plan


def _nlvr2_line(split: str, pair: dict, sid: int, text: str, label: str, r: np.random.Generator) -> dict:
    stem = f"{split}-{pair['set_id']}-{pair['pair_id']}"
    worker = str(int(r.integers(160)))
    line = {"validation": {worker: label}, "sentence": text,
            "left_url": f"https://example.com/nlvr2-demo/{stem}-img0.png", "writer": str(int(r.integers(160))),
            "label": label, "right_url": f"https://example.com/nlvr2-demo/{stem}-img1.png",
            "synset": "geometric shape", "query": f"coloured shapes{pair['set_id'] % 37}",
            "identifier": f"{stem}-{sid}"}
    if split != "train":
        line["extra_validations"] = {str(int(r.integers(160))): label for _ in range(4)}
    if "directory" in pair:
        line["directory"] = pair["directory"]
    return line


def _remove_own(out: Path, patterns: list[tuple[str, str]]) -> None:
    """Images an earlier run with other arguments wrote (other names): remove ours only."""
    for sub, pattern in patterns:
        d = out / sub
        if d.is_dir():
            for p in sorted(d.glob(pattern)) + sorted(d.glob(pattern + ".tmp")):
                p.unlink()


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def write_nlvr2(out_dir, args=None, seed: int = 0, *, train: int = 100, dev: int = 32, test: int = 32) -> dict:
    """Write the NLVR2 demo under out_dir/nlvr2 (train / dev / test1: that many image pairs, two sentences each)
    and return its manifest part: relative paths, counts, junk, what the readers give (`expected`), file sizes.
    `args`: anything with image_size / jpeg_quality (TaskDemoArgs); defaults 64 / 90."""
    out = Path(out_dir)
    counts = {"train": train, "dev": dev, "test1": test}
    if min(counts.values()) < 1:
        raise ValueError(f"write_nlvr2: every split needs >= 1 pair, got {counts}")
    _remove_own(out, [(f"{NLVR2_DIR}/images/train", "*/*-img[01].png"), (f"{NLVR2_DIR}/dev", "*-img[01].png"),
                      (f"{NLVR2_DIR}/test1", "*-img[01].png")])
    files, paths, plan = TreeWriter(out), nlvr2_paths(), plan_nlvr2(seed, counts)
    expected, junk = {}, {}
    for k, (split, pairs) in enumerate(plan.items()):
        r = _rng(seed, 410, k)
        lines, n_img = [], 0
        if split == "train":   # junk: its own pairs at the end of the set list, images as the others
            extra = _scene_descs(_rng(seed, 420), 4)
            top = max(p["set_id"] for p in pairs)
            pairs = pairs + [
                {"set_id": top + 1, "pair_id": 0, "directory": (top + 1) % 10, "left": extra[0], "right": extra[1],
                 "sentences": [(0, "", True), (1, "The left image contains a shape.", "maybe")], "junk": "lines"},
                {"set_id": top + 2, "pair_id": 1, "directory": (top + 2) % 10, "left": extra[2], "right": extra[3],
                 "sentences": [(0, "The left image contains more shapes than the right image.",
                                len(scene_objects(extra[2])) > len(scene_objects(extra[3])))],
                 "junk": "no_right_image"}]
        for pair in pairs:
            stem = f"{split}-{pair['set_id']}-{pair['pair_id']}"
            sub = f"{pair['directory']}/" if "directory" in pair else ""
            for side, desc in (("img0", pair["left"]), ("img1", pair["right"])):
                if side == "img1" and pair.get("junk") == "no_right_image":
                    junk["missing_image"] = f"{paths[split]['image_root']}/{sub}{stem}-img1.png"
                    continue
                fmt = "JPEG" if n_img % 4 == 3 else "PNG"
                files.write(f"{paths[split]['image_root']}/{sub}{stem}-{side}.png",
                            _image_bytes(desc, args, _rng(seed, 430, k, pair["set_id"], side == "img1"), fmt))
                n_img += 1
            for sid, text, truth in pair["sentences"]:
                label = truth if isinstance(truth, str) else ("True" if truth else "False")
                lines.append(_nlvr2_line(split, pair, sid, text, label, r))
        order = [lines[int(i)] for i in r.permutation(len(lines))]
        files.write(paths[split]["annotations"], _jsonl(order))
        n = 2 * counts[split]
        expected[split] = {**paths[split], "items": n + (1 if split == "train" else 0),
                           "skipped": {"bad_label": 1, "empty_sentence": 1} if split == "train" else {},
                           "load_skipped": {"missing_image": 1} if split == "train" else {},
                           "true": sum(t for p in plan[split] for _, _, t in p["sentences"])}
    junk["lines"] = "train.json: one line with an empty sentence, one with label 'maybe'"
    return {"annotations": {s: p["annotations"] for s, p in paths.items()},
            "image_roots": {s: p["image_root"] for s, p in paths.items()},
            "counts": {"pairs": counts, "examples": {s: 2 * n for s, n in counts.items()}},
            "junk": junk, "expected": expected, "files": dict(sorted(files.sizes.items()))}


# ------------------------------------------------------------------------------------------------------ SNLI-VE
def snli_ve_hypotheses(desc: tuple) -> dict[str, list[str]]:
    """Every templated hypothesis about a scene, by gold label."""
    objs = scene_objects(desc)
    present = {(o[1], o[2]) for o in objs}
    ent = [f"There is {_a(c)} {s}." for c, s in sorted(present)]
    ent += [f"A {o[0]} {o[2]} is in the picture." for o in objs]
    ent.append(f"There {'is' if len(objs) == 1 else 'are'} {NUMBER[len(objs)]} "
               f"{'shape' if len(objs) == 1 else 'shapes'} in the picture.")
    con = [f"There is {_a(c)} {s}." for c in COLORS for s in SHAPES if (c, s) not in present]
    con += [f"There are {NUMBER[n]} shapes in the picture." for n in (2, 3, 4) if n != len(objs)]
    con.append("The picture is empty.")
    if len(desc) == 3:
        a, rel, b = desc
        ent.append(f"The {a[1]} {a[2]} is {rel} the {b[1]} {b[2]}.")
        con.append(f"The {a[1]} {a[2]} is {INVERSE[rel]} the {b[1]} {b[2]}.")
    neu = [f"The {o[1]} {o[2]} {p}." for o in objs for p in NEUTRAL_PHRASES]
    return {"entailment": ent, "neutral": neu, "contradiction": con}


def plan_snli_ve(seed: int, counts: dict[str, int]) -> dict[str, list[dict]]:
    """Per split, the images: {flickr_id, desc, caption_index, hypotheses [(gold_label, text)]} (one per label)."""
    plan, taken = {}, set()
    for k, split in enumerate(SNLI_SPLITS):
        n = counts[split]
        r = _rng(seed, 500, k)
        descs = _scene_descs(r, n)
        ids = []
        while len(ids) < n:
            v = int(r.integers(1_000_000, 5_000_000_000))
            if v not in taken:
                taken.add(v)
                ids.append(v)
        images = []
        for fid, desc in zip(ids, descs):
            hyps = snli_ve_hypotheses(desc)
            order = [("entailment", "neutral", "contradiction")[int(i)] for i in r.permutation(3)]
            images.append({"flickr_id": fid, "desc": desc, "caption_index": int(r.integers(5)),
                           "hypotheses": [(g, hyps[g][int(r.integers(len(hyps[g])))]) for g in order]})
        plan[split] = images
    plan["_taken"] = sorted(taken)
    return plan


def _parse(text: str) -> tuple[str, str]:
    """A flat stand-in for SNLI's (binary) parses: the tokens under one bracket."""
    toks = text.rstrip(".").split() + ["."]
    return "( " + " ".join(toks) + " )", "(ROOT (S " + " ".join(f"(X {t})" for t in toks) + "))"


def _snli_line(image: dict, gold: str, text: str, k: int, split: str, r: np.random.Generator) -> dict:
    caption = _caption_of(image["desc"])
    premise = caption[0].upper() + caption[1:] + "."
    cap_id = f"{image['flickr_id']}.jpg#{image['caption_index']}"
    labels = [gold] if split == "train" else \
        [gold] * 3 + [gold if r.random() < 0.7 else ("neutral" if gold != "neutral" else "entailment")
                      for _ in range(2)]
    p1b, p1 = _parse(premise)
    p2b, p2 = _parse(text) if text else ("", "")
    line = {"Flickr30K_ID": str(image["flickr_id"]), "annotator_labels": labels, "captionID": cap_id,
            "gold_label": gold, "pairID": f"{cap_id}r{k + 1}{gold[0]}", "sentence1": premise,
            "sentence1_binary_parse": p1b, "sentence1_parse": p1, "sentence2": text,
            "sentence2_binary_parse": p2b, "sentence2_parse": p2}
    return dict(sorted(line.items()))   # as the release's generator writes them: keys sorted


def write_snli_ve(out_dir, args=None, seed: int = 0, *, train: int = 100, dev: int = 32, test: int = 32) -> dict:
    """Write the SNLI-VE demo under out_dir/snli_ve (that many images per split, one hypothesis per label each) and
    return its manifest part (as write_nlvr2's)."""
    out = Path(out_dir)
    counts = {"train": train, "dev": dev, "test": test}
    if min(counts.values()) < 1:
        raise ValueError(f"write_snli_ve: every split needs >= 1 image, got {counts}")
    _remove_own(out, [(SNLI_IMAGES, "*.jpg")])
    files, paths, plan = TreeWriter(out), snli_ve_paths(), plan_snli_ve(seed, counts)
    taken = set(plan.pop("_taken"))
    missing = next(v for v in range(1_000_000_000, 2_000_000_000, 7919) if v not in taken)
    expected, junk = {}, {}
    for k, split in enumerate(SNLI_SPLITS):
        r = _rng(seed, 510, k)
        lines = []
        for i, image in enumerate(plan[split]):
            files.write(f"{SNLI_IMAGES}/{image['flickr_id']}.jpg",
                        _image_bytes(image["desc"], args, _rng(seed, 520, k, i), "JPEG"))
            for j, (gold, text) in enumerate(image["hypotheses"]):
                lines.append(_snli_line(image, gold, text, j, split, r))
        if split == "train":   # junk: a line without a gold label, an empty hypothesis, an image not written
            first = plan[split][0]
            lines.insert(4, _snli_line(first, "-", "The picture shows something.", 3, split, r))
            lines.insert(9, _snli_line(plan[split][1], "neutral", "", 3, split, r))
            ghost = {"flickr_id": missing, "desc": first["desc"], "caption_index": 0}
            lines.append(_snli_line(ghost, "entailment", snli_ve_hypotheses(first["desc"])["entailment"][0], 0,
                                    split, r))
            junk = {"lines": "snli_ve_train.jsonl: one line with gold_label '-', one with an empty sentence2",
                    "missing_image": f"{SNLI_IMAGES}/{missing}.jpg"}
        files.write(paths[split]["annotations"], _jsonl(lines))
        n = 3 * counts[split]
        expected[split] = {**paths[split], "items": n + (1 if split == "train" else 0),
                           "skipped": {"no_gold_label": 1, "empty_sentence": 1} if split == "train" else {},
                           "load_skipped": {"missing_image": 1} if split == "train" else {}}
    return {"annotations": {s: p["annotations"] for s, p in paths.items()}, "image_root": SNLI_IMAGES,
            "counts": {"images": counts, "hypotheses": {s: 3 * n for s, n in counts.items()}},
            "junk": junk, "expected": expected, "files": dict(sorted(files.sizes.items()))}


def write_pairs(out_dir, args=None, seed: int = 0, **counts) -> dict:
    """Both sets: {"nlvr2": write_nlvr2(...), "snli_ve": write_snli_ve(...)}. counts: nlvr2_train / nlvr2_dev /
    nlvr2_test (image pairs), snli_ve_train / snli_ve_dev / snli_ve_test (images)."""
    unknown = set(counts) - {f"{t}_{s}" for t in ("nlvr2", "snli_ve") for s in ("train", "dev", "test")}
    if unknown:
        raise TypeError(f"write_pairs: unknown count(s) {sorted(unknown)}")
    pick = lambda t: {s: counts[f"{t}_{s}"] for s in ("train", "dev", "test") if f"{t}_{s}" in counts}   # noqa: E731
    return {"nlvr2": write_nlvr2(out_dir, args, seed, **pick("nlvr2")),
            "snli_ve": write_snli_ve(out_dir, args, seed, **pick("snli_ve"))}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args(argv)
    man = write_pairs(a.out, argparse.Namespace(image_size=a.image_size, jpeg_quality=90), a.seed)
    for task, part in man.items():
        print(f"{task}: {sum(part['files'].values()) / 1e6:.1f} MB in {len(part['files'])} files; "
              f"{json.dumps({s: e['items'] for s, e in part['expected'].items()})} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
