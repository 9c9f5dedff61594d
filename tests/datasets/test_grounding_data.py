"""RefCOCO+ grounding readers (datasets/grounding.py: ALBEF's layout, junk counted, wrong layouts as one line) and
the demo writer (datasets/demo_grounding.py: deterministic, counts as stated, every true box on its object)."""
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from datasets import grounding as G
from datasets.loader import BadSample


def _jpg(path, size=(20, 10), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/a.jpg", "e.jpg"):
        _jpg(root / name)
    train = _dump(tmp_path / "train.json", [
        {"image": "a.jpg", "text": "the man", "ref_id": 1},
        {"image": "a.jpg", "caption": "  man on\tthe left  "},       # "caption" accepted, whitespace collapsed
        "not an object",                                              # bad_entry
        {"text": "no image"},                                         # missing_field
        {"image": 7, "text": "x"},                                    # bad_field
        {"image": "b.jpg", "text": "   "},                            # empty_expression
        {"image": "b.jpg"},                                           # empty_expression (no text at all)
        {"image": "b.jpg", "text": ["a list"]},                       # empty_expression (not a string)
        {"image": "gone.jpg", "text": "a cat"},                       # missing_image
        {"image": "b.jpg", "text": "the dog"},
        {"image": "sub/a.jpg", "text": "the other a"},                # another file, the same name: same image id
    ])
    refs = _dump(tmp_path / "refs.json", {
        "10": {"image_id": 1, "bbox": [1, 2, 3, 4], "split": "val"},
        "11": {"image_id": 2, "bbox": [0, 0, 5, 5], "split": "testA"},
        "12": {"image_id": 3, "bbox": [0, 0, 5, 5], "split": "testB"},
        "13": {"image_id": 1, "bbox": None, "split": "val"},          # ref_without_box
        "14": {"image_id": 1, "bbox": [0, 0, 0, 5], "split": "val"},  # ref_without_box (zero width)
        "15": ["not", "an", "object"],                                # bad_ref
        "16": {"image_id": 4, "bbox": [1, 1, 2, 2], "split": "val"},  # image 4 has no proposals
        "17": {"image_id": 1, "bbox": [1, 1, 2, 2], "split": "train"},  # not a selected split
        "18": {"image_id": 5, "bbox": [1, 1, 2, 2], "split": "testB"},  # image 5: every proposal row is junk
    })
    dets = _dump(tmp_path / "dets.json", {
        "1": [[0, 0, 4, 4], [1.5, 2.5, 3, 4, 0.9, 1], "junk", [1, 2, 3]],   # 2 bad_proposal rows
        "2": [[0, 0, 5, 5]],
        "3": [[2, 2, 2, 2], [0, 0, -1, 3]],                                   # 1 bad_proposal (negative width)
        "4": [],
        "5": [[None, 1, 2, 3]],                                               # 1 bad_proposal
    })
    test = _dump(tmp_path / "test.json", [
        {"image": "c.jpg", "text": "testB thing", "ref_id": 12},
        {"image": "a.jpg", "text": "the man", "ref_id": 10},
        {"image": "b.jpg", "text": "testA thing", "ref_id": "11"},    # a string ref_id names the same ref
        {"image": "a.jpg", "text": "x", "ref_id": 13},
        {"image": "a.jpg", "text": "x", "ref_id": 14},
        {"image": "a.jpg", "text": "x", "ref_id": 15},
        {"image": "a.jpg", "text": "x", "ref_id": 99},                # unknown_ref
        {"image": "a.jpg", "text": "x"},                              # missing_field
        {"image": "a.jpg", "text": "x", "ref_id": [10]},              # bad_field
        {"image": "a.jpg", "text": "", "ref_id": 10},                 # empty_expression
        {"image": "gone.jpg", "text": "x", "ref_id": 10},             # missing_image
        {"image": "e.jpg", "text": "x", "ref_id": 16},                # no_proposals
        {"image": "e.jpg", "text": "x", "ref_id": 18},                # no_proposals
        {"image": "a.jpg", "text": "train expr", "ref_id": 17},       # split not selected: left out, not counted
    ])
    return {"root": str(root), "train": train, "refs": refs, "dets": dets, "test": test, "tmp": tmp_path}


def test_train_reader_groups_by_image_and_counts_junk(files):
    rset = G.read_grounding_train([files["train"]], files["root"])
    names = [p.split("images/")[1] for p in rset.media]
    assert names == ["a.jpg", "b.jpg", "sub/a.jpg"]
    assert rset.texts == ["the man", "man on the left", "the dog", "the other a"]
    assert rset.txt2media == [0, 0, 1, 2]
    assert rset.media_ids == [0, 1, 0]   # ALBEF's img_ids: by file name, so sub/a.jpg is a.jpg's image
    assert rset.skipped == {"bad_entry": 1, "missing_field": 1, "bad_field": 1, "empty_expression": 3,
                            "missing_image": 1}


def test_eval_reader_items_splits_and_junk(files):
    refs = G.read_refs(files["refs"])
    dets, bad = G.read_dets(files["dets"])
    assert bad == {"bad_proposal": 4}
    assert dets["1"] == [(0.0, 0.0, 4.0, 4.0), (1.5, 2.5, 3.0, 4.0)] and dets["5"] == []
    items, skipped = G.read_grounding_eval([files["test"]], files["root"], refs, dets)
    assert [(it.split, it.ref_id, it.text) for it in items] == [
        ("val", "10", "the man"), ("testA", "11", "testA thing"), ("testB", "12", "testB thing")]   # by split
    assert items[0].box == (1.0, 2.0, 3.0, 4.0) and items[0].image_id == "1"
    assert items[0].proposals == ((0.0, 0.0, 4.0, 4.0), (1.5, 2.5, 3.0, 4.0))
    assert skipped == {"missing_field": 1, "bad_field": 1, "empty_expression": 1, "missing_image": 1,
                       "unknown_ref": 1, "bad_ref": 1, "ref_without_box": 2, "no_proposals": 2}
    only_val, skipped_val = G.read_grounding_eval([files["test"]], files["root"], refs, dets, ["val"])
    assert [it.ref_id for it in only_val] == ["10"]
    assert skipped_val["no_proposals"] == 1   # ref 18 (testB) is not selected: neither kept nor counted


@pytest.mark.parametrize("which, content, message", [
    ("train", {"image": "a.jpg"}, "not an ALBEF grounding file (expected a JSON list"),
    ("refs", [], "not a refs file (expected a JSON object"),
    ("dets", [[1, 2, 3, 4]], "not a detections file (expected a JSON object"),
    ("dets", "{not json", "not a JSON file"),
])
def test_wrong_layout_is_one_line_naming_the_file(tmp_path, which, content, message):
    path = tmp_path / f"{which}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    fn = {"train": lambda p: G.read_grounding_train([p], str(tmp_path)), "refs": G.read_refs,
          "dets": G.read_dets}[which]
    with pytest.raises(ValueError) as e:
        fn(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_eval_image_geometry_and_bad_images(tmp_path):
    img = Image.new("RGB", (120, 80), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([30, 20, 71, 39], fill=(255, 255, 255))   # x 30..71, y 20..39
    img.save(tmp_path / "r.png")
    px, size = G.read_eval_image(str(tmp_path / "r.png"), 40, "square")
    assert px.shape == (1, 3, 40, 40) and px.dtype == G.torch.uint8 and size == (120, 80)
    ys, xs = np.nonzero(px[0, 0].numpy() > 128)   # whole image to 40 x 40: x / 3, y / 2
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 23, 10, 19)
    px, _ = G.read_eval_image(str(tmp_path / "r.png"), 40, "crop")
    ys, xs = np.nonzero(px[0, 0].numpy() > 128)   # centre 80 x 80 crop from x = 20, to 40 x 40: / 2
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 25, 10, 19)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for name, reason in (("bad.jpg", "bad_image"), ("none.jpg", "missing_image")):
        with pytest.raises(BadSample) as e:
            G.read_eval_image(str(tmp_path / name), 40, "square")
        assert e.value.reason == reason
    with pytest.raises(BadSample) as e:
        G.read_eval_image(str(tmp_path / "r.png"), 40, "square", max_pixels=100)
    assert e.value.reason == "oversize_image"


# ----------------------------------------------------------------------------------------------- the demo set
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from datasets.demo_grounding import write_grounding

    root = tmp_path_factory.mktemp("grounding_demo")
    return root, write_grounding(root, seed=0, image_size=32)


def test_demo_is_deterministic_and_counts_what_it_says(demo, tmp_path):
    from datasets.demo_grounding import write_grounding

    root, man = demo
    again = write_grounding(tmp_path / "again", seed=0, image_size=32)
    assert again == man
    for rel in man["files"]:
        assert (root / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = write_grounding(tmp_path / "other", seed=1, image_size=32)
    assert (tmp_path / "other" / man["annotations"]["train"]).read_bytes() != (root / man["annotations"]["train"]).read_bytes()
    assert other["counts"]["expressions"] == man["counts"]["expressions"]
    a = {k: str(root / v) for k, v in man["annotations"].items()}
    image_root = str(root / man["image_root"])
    rset = G.read_grounding_train([a["train"]], image_root)
    assert len(rset.texts) == man["counts"]["expressions"]["train"] == 300
    assert rset.skipped == man["expected"]["train_skipped"]
    items, skipped = G.read_grounding_eval([a["val"], a["test"]], image_root, G.read_refs(a["refs"]),
                                           G.read_dets(a["dets"])[0])
    assert skipped == man["expected"]["eval_skipped"]
    assert {s: sum(it.split == s for it in items) for s in G.SPLITS} == {"val": 48, "testA": 48, "testB": 48}
    assert all(len(it.proposals) >= 4 for it in items)


RELATION = {"left of": lambda a, b: a[2] <= b[0], "right of": lambda a, b: a[0] >= b[2],
            "above": lambda a, b: a[3] <= b[1], "below": lambda a, b: a[1] >= b[3]}
EXPR = re.compile(r"^the (?:(small|large) )?(?:(red|green|blue|yellow|purple|orange) )?(circle|square|triangle|"
                  r"diamond|cross)(?: (left of|right of|above|below) the (\w+) (\w+))?$")


def test_demo_true_boxes_cover_the_described_object(demo):
    """Independent of the writer: the expression parsed by a regex describes its object and no other in the scene
    (attributes, and a relation to a unique anchor that holds), the object's pixels (drawn here with demo_data._draw_shape) lie inside the true box and touch all
    four of its sides, and most of them show the target's colour in the JPEG."""
    from datasets.demo_data import COLORS, _draw_shape

    root, man = demo
    refs = json.loads((root / man["annotations"]["refs"]).read_text())
    scenes = json.loads((root / man["annotations"]["scenes"]).read_text())
    texts = {e["ref_id"]: e["text"] for k in ("train", "val", "test")
             for e in json.loads((root / man["annotations"][k]).read_text())}
    anchors = np.array(list(COLORS.values()), dtype=float)
    names = list(COLORS)
    checked = 0
    for image_id, scene in scenes.items():
        w, h = scene["width"], scene["height"]
        path = root / man["image_root"] / f"train2014/COCO_train2014_{int(image_id):012d}.jpg"
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert pixels.shape == (h, w, 3) and w != h
        nearest = np.argmin(((pixels[:, :, None, :] - anchors) ** 2).sum(-1), axis=-1)
        for ref_id, oi in scene["refs"].items():
            obj, ref = scene["objects"][oi], refs[ref_id]
            assert ref["image_id"] == int(image_id)
            m = EXPR.match(texts[int(ref_id)])
            assert m, texts[int(ref_id)]
            size, color, shape, rel, acolor, ashape = m.groups()
            fits = [o for o in scene["objects"] if o["shape"] == shape and color in (None, o["color"])
                    and size in (None, o["size"])]
            if rel:
                anchor = [o for o in scene["objects"] if (o["color"], o["shape"]) == (acolor, ashape)]
                assert len(anchor) == 1
                fits = [o for o in fits if o is not anchor[0] and RELATION[rel](o["box"], anchor[0]["box"])]
            assert fits == [obj], texts[int(ref_id)]   # the expression singles out its object
            canvas = Image.new("L", (w, h), 0)
            _draw_shape(ImageDraw.Draw(canvas), obj["shape"], obj["box"], 255)
            mask = np.asarray(canvas) > 0
            x, y, bw, bh = ref["bbox"]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x, x + bw, y, y + bh)
            assert (nearest[mask] == names.index(obj["color"])).mean() > 0.8
            checked += 1
    assert checked == 300 + 3 * 48
