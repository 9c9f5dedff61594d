"""A deterministic demo RefCOCO+ grounding set in the layout datasets/grounding.py reads (ALBEF's converted files).

Scenes are datasets/demo_data.py's coloured shapes (its drawing, colours, shapes and sizes), 2 or 3 objects on a
W x H = 1.25 S x S image (not square, so the eval geometry is exercised). Each object gets at most one referring
expression that singles it out in its scene: "the circle", "the red circle", "the small circle", "the small red
circle", or relational "the square left of the blue triangle" / "the large square below the red circle" (the target
lies wholly to that side of the anchor and is the only object of its words there). Proposals (dets.json) are every
object's box moved by up to a pixel per edge (as a detector would, IoU with the truth well above 0.5) plus two random
distractor boxes, in a shuffled order, floats with two decimals.

  grounding/images/train2014/COCO_train2014_<image_id:012d>.jpg
  grounding/refcoco+_train.json      [{image, text, ref_id}], one entry per expression (ALBEF: "text")
  grounding/refcoco+_val.json        [{image, text, ref_id}]
  grounding/refcoco+_test.json       [{image, text, ref_id}]: testA and testB together, as ALBEF ships it
  grounding/refcoco+/annotations.json  {ref_id: {image_id, bbox [x, y, w, h], split}}  (the refs JSON)
  grounding/refcoco+/dets.json       {image_id: [[x, y, w, h], ...]}
  grounding/scenes.json              demo only, for tests: {image_id: {"width", "height", "objects": [{size, color,
                                     shape, box [x0, y0, x1, y1] half-open}], "refs": {ref_id: object index}}}
Splits: train (300 expressions), val, testA (3-object scenes: crowded, as RefCOCO+ testA's people), testB (2-object
scenes) (48 each). Deliberate junk the readers must skip, besides those: a train entry with a blank text
(empty_expression), a train entry whose image is not written (missing_image), a val expression whose ref has no
box (ref_without_box), a testB expression whose image has no dets.json entry (no_proposals). The same seed gives
byte-identical files.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.demo_data import COLORS, SHAPES, SIZES, _background, _draw_shape, _rng, _write_atomic

DIR = "grounding"
VERSION = 1
COUNTS = {"train": 300, "val": 48, "testA": 48, "testB": 48}
OBJECTS = {"train": (2, 3), "val": (2, 3), "testA": (3,), "testB": (2,)}   # objects per scene
RELATIONS = {"left of": lambda a, b: a[2] <= b[0], "right of": lambda a, b: a[0] >= b[2],
             "above": lambda a, b: a[3] <= b[1], "below": lambda a, b: a[1] >= b[3]}
JPEG_QUALITY = 90
FILES = {"train": f"{DIR}/refcoco+_train.json", "val": f"{DIR}/refcoco+_val.json",
         "test": f"{DIR}/refcoco+_test.json", "refs": f"{DIR}/refcoco+/annotations.json",
         "dets": f"{DIR}/refcoco+/dets.json", "scenes": f"{DIR}/scenes.json"}
IMAGE_ROOT = f"{DIR}/images"
EXPECTED = {"train_skipped": {"empty_expression": 1, "missing_image": 1},
            "eval_skipped": {"ref_without_box": 1, "no_proposals": 1}}


def image_shape(image_size: int) -> tuple[int, int]:
    """(width, height) of the demo images."""
    return 2 * round(image_size * 1.25 / 2), image_size


def _image_rel(image_id: int) -> str:
    return f"train2014/COCO_train2014_{image_id:012d}.jpg"


# ------------------------------------------------------------------------------------------------------ scenes
def _place(r: np.random.Generator, sides: list[int], w: int, h: int) -> list[list[int]] | None:
    """Non-overlapping boxes (1 px apart, 1 px from the border) of the given sides, or None."""
    boxes: list[list[int]] = []
    for side in sides:
        for _ in range(60):
            x0, y0 = int(r.integers(1, w - side)), int(r.integers(1, h - side))
            b = [x0, y0, x0 + side, y0 + side]
            if all(b[2] + 1 <= o[0] or o[2] + 1 <= b[0] or b[3] + 1 <= o[1] or o[3] + 1 <= b[1] for o in boxes):
                boxes.append(b)
                break
        else:
            return None
    return boxes


def make_objects(r: np.random.Generator, n: int, w: int, h: int) -> list[dict]:
    """n objects with distinct (colour, shape), sizes from demo_data.SIZES (side as a fraction of the height),
    sometimes sharing a colour or a shape so that expressions need more than one word."""
    while True:
        colors, shapes = list(COLORS), list(SHAPES)
        objs = []
        for _ in range(n):
            c = colors[int(r.integers(len(colors)))] if not objs or r.random() < 0.6 else objs[0]["color"]
            s = shapes[int(r.integers(len(shapes)))] if not objs or r.random() < 0.6 else objs[0]["shape"]
            if any(o["color"] == c and o["shape"] == s for o in objs):
                break
            size = "large" if r.random() < (0.4 if n == 2 else 0.2) else "small"
            objs.append({"size": size, "color": c, "shape": s})
        if len(objs) < n:
            continue
        sides = [int(round(r.uniform(*SIZES[o["size"]]) * h)) for o in objs]
        boxes = _place(r, sides, w, h)
        if boxes is None:
            continue
        for o, b in zip(objs, boxes):
            o["box"] = b
        return objs


def _matches(o: dict, words: dict) -> bool:
    return all(o[k] == v for k, v in words.items())


def resolve(objs: list[dict], words: dict, relation: tuple | None = None) -> list[int]:
    """Indices of the objects an expression describes: those with `words` ({size?, color?, shape}) that stand in
    `relation` (name, anchor index) to the anchor."""
    out = []
    for i, o in enumerate(objs):
        if not _matches(o, words):
            continue
        if relation is not None:
            name, a = relation
            if a == i or not RELATIONS[name](o["box"], objs[a]["box"]):
                continue
        out.append(i)
    return out


def _phrase(words: dict) -> str:
    return " ".join(words[k] for k in ("size", "color", "shape") if k in words)


def expressions(objs: list[dict], target: int) -> tuple[list[str], list[str]]:
    """Every demo expression that singles out objs[target] (resolve() gives exactly it): (attribute-only ones,
    relational ones)."""
    o = objs[target]
    plain, relational = [], []
    for keys in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
        words = {k: o[k] for k in keys}
        if resolve(objs, words) == [target]:
            plain.append(f"the {_phrase(words)}")
    for a, anchor in enumerate(objs):
        if a == target:
            continue
        anchor_words = {"color": anchor["color"], "shape": anchor["shape"]}   # (colour, shape) is unique
        for name in RELATIONS:
            for keys in (("shape",), ("size", "shape")):
                words = {k: o[k] for k in keys}
                if resolve(objs, words, (name, a)) == [target]:
                    relational.append(f"the {_phrase(words)} {name} the {_phrase(anchor_words)}")
    return plain, relational


def draw(objs: list[dict], w: int, h: int, r: np.random.Generator) -> Image.Image:
    bg = _background(r, max(w, h))[:h, :w]
    img = Image.fromarray(np.ascontiguousarray(bg))
    d = ImageDraw.Draw(img)
    for o in objs:
        _draw_shape(d, o["shape"], o["box"], COLORS[o["color"]])
    return img


def shape_mask(shape: str, box: list[int], w: int, h: int) -> np.ndarray:
    """(h, w) bool: the pixels demo_data._draw_shape paints for this shape and box."""
    canvas = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, box, 255)
    return np.asarray(canvas) > 0


def xywh(box: list[int]) -> list[int]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def proposals(objs: list[dict], w: int, h: int, r: np.random.Generator) -> list[list[float]]:
    props = []
    for o in objs:
        x0, y0, x1, y1 = (v + float(r.uniform(-1, 1)) for v in o["box"])
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(w), x1), min(float(h), y1)
        props.append([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
    for _ in range(2):
        bw, bh = float(r.uniform(0.15, 0.5) * w), float(r.uniform(0.15, 0.5) * h)
        x, y = float(r.uniform(0, w - bw)), float(r.uniform(0, h - bh))
        props.append([round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)])
    order = r.permutation(len(props))
    return [props[int(i)] for i in order]


# ------------------------------------------------------------------------------------------------------ writing
def write_grounding(out_dir, seed: int = 0, image_size: int = 64) -> dict:
    """Write the demo set under out_dir/grounding (module docstring) -> the manifest part: {"dir", "version",
    "image_size": [W, H], "annotations": {train, val, test, refs, dets, scenes} and "image_root" (relative to
    out_dir), "counts": {"images": {split: n}, "expressions": {split: n}}, "junk": {where: what}, "expected":
    {"train_skipped", "eval_skipped"} (what the readers must count), "files": {relative path: size}}."""
    out = Path(out_dir)
    w, h = image_shape(image_size)
    files: dict[str, int] = {}

    def put(rel: str, data: bytes) -> None:
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(p, data)
        files[rel] = len(data)

    entries = {"train": [], "val": [], "test": []}
    refs, dets, scenes = {}, {}, {}
    images = {s: 0 for s in COUNTS}
    next_image, next_ref = 100_000, 0
    for si, split in enumerate(COUNTS):
        r = _rng(seed, 40, si)
        made = 0
        while made < COUNTS[split]:
            n = OBJECTS[split][int(r.integers(len(OBJECTS[split])))]
            objs = make_objects(r, n, w, h)
            image_id, next_image = next_image, next_image + 1
            scene = {"width": w, "height": h, "objects": objs, "refs": {}}
            for t in r.permutation(n):
                plain, relational = expressions(objs, int(t))
                options = relational if relational and (not plain or r.random() < 0.4) else plain
                if not options or made == COUNTS[split]:
                    continue
                text = options[int(r.integers(len(options)))]
                ref_id, next_ref = next_ref, next_ref + 1
                refs[str(ref_id)] = {"image_id": image_id, "bbox": xywh(objs[int(t)]["box"]), "split": split}
                scene["refs"][str(ref_id)] = int(t)
                entries["train" if split == "train" else "val" if split == "val" else "test"].append(
                    {"image": _image_rel(image_id), "text": text, "ref_id": ref_id})
                made += 1
            if not scene["refs"]:
                continue   # an image without expressions is not written
            buf = io.BytesIO()
            draw(objs, w, h, r).save(buf, format="JPEG", quality=JPEG_QUALITY)
            put(f"{IMAGE_ROOT}/{_image_rel(image_id)}", buf.getvalue())
            dets[str(image_id)] = proposals(objs, w, h, r)
            scenes[str(image_id)] = scene
            images[split] += 1
    # the junk (module docstring): not part of the counts
    first = next(iter(scenes))
    entries["train"].insert(len(entries["train"]) // 2, {"image": _image_rel(int(first)), "text": "   ",
                                                         "ref_id": next_ref})
    entries["train"].append({"image": _image_rel(next_image), "text": "the red circle", "ref_id": next_ref + 1})
    val_image = next(k for k, sc in scenes.items() if refs[next(iter(sc["refs"]))]["split"] == "val")
    refs[str(next_ref + 2)] = {"image_id": int(val_image), "bbox": None, "split": "val"}
    entries["val"].insert(3, {"image": _image_rel(int(val_image)), "text": "the thing", "ref_id": next_ref + 2})
    junk_image = next_image + 1
    r = _rng(seed, 41)
    objs = make_objects(r, 2, w, h)
    buf = io.BytesIO()
    draw(objs, w, h, r).save(buf, format="JPEG", quality=JPEG_QUALITY)
    put(f"{IMAGE_ROOT}/{_image_rel(junk_image)}", buf.getvalue())
    refs[str(next_ref + 3)] = {"image_id": junk_image, "bbox": xywh(objs[0]["box"]), "split": "testB"}
    entries["test"].append({"image": _image_rel(junk_image), "text": f"the {objs[0]['color']} {objs[0]['shape']}",
                            "ref_id": next_ref + 3})

    dump = lambda obj: json.dumps(obj).encode()  # noqa: E731 - compact, keys in the order written
    for key in ("train", "val", "test"):
        put(FILES[key], dump(entries[key]))
    put(FILES["refs"], dump(refs))
    put(FILES["dets"], dump(dets))
    put(FILES["scenes"], dump(scenes))
    return {"dir": DIR, "version": VERSION, "image_size": [w, h], "annotations": dict(FILES),
            "image_root": IMAGE_ROOT, "counts": {"images": images, "expressions": dict(COUNTS)},
            "junk": {"train": "one entry with a blank text; one entry whose image is not written",
                     "val": f"ref {next_ref + 2} has no box",
                     "testB": f"image {junk_image} (ref {next_ref + 3}) has no dets.json entry"},
            "expected": json.loads(json.dumps(EXPECTED)), "files": dict(sorted(files.items()))}
