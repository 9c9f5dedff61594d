"""datasets/demo_data.py's ALIGN-BENCH-format set (issue 12): DIR/images/N.jpg + DIR/pkls/N.pkl, each pickle
{"caption": str, "annotation": {phrase: [{"bbox_mask": [x1, y1, x2, y2], "pixel_mask": HxW bool}]}}.

The pickles are read with the test's own restricted unpickler, and the masks are checked against the JPEG's pixels
and the colour palette only, not against the generator's drawing code."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import io
import json
import os
import pickle
import subprocess

import numpy as np
import pytest
from PIL import Image

from datasets import demo_data  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
# no videos: the align set does not depend on them and mp4 encoding is the slow part of a generation
KW = dict(image_size=32, train_images=40, val_images=6, train_videos=0, val_videos=0, train_image_shards=2,
          train_video_shards=1, align_items=24)


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    out = tmp_path_factory.mktemp("align_demo")
    man = demo_data.generate(out, **KW)
    return man, out


# ----------------------------------------------------------------------------------------------- reading
class _Refused(pickle.UnpicklingError):
    pass


class StrictUnpickler(pickle.Unpickler):
    """Rebuilds plain containers and numpy arrays (numpy's own array reconstruction) and nothing else."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _load(data: bytes):
    return StrictUnpickler(io.BytesIO(data)).load()


def _plain(x, where="item"):
    """Assert x holds only dict (str keys) / list / str / int / float / bool and 2-D numpy bool arrays."""
    if isinstance(x, dict):
        for k, v in x.items():
            assert type(k) is str, f"{where}: key {k!r} is {type(k).__name__}"
            _plain(v, f"{where}[{k!r}]")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _plain(v, f"{where}[{i}]")
    elif isinstance(x, np.ndarray):
        assert type(x) is np.ndarray and x.dtype == np.bool_ and x.ndim == 2, f"{where}: {x.dtype} {x.shape}"
    else:
        assert type(x) in (str, int, float, bool), f"{where}: {type(x).__name__} is not a plain type"


def _items(out: pathlib.Path):
    """[(N, caption, annotation, image as HxWx3 uint8)] in N order."""
    root = out / "align_bench"
    res = []
    for n in range(len(list((root / "pkls").glob("*.pkl")))):
        item = _load((root / "pkls" / f"{n}.pkl").read_bytes())
        with Image.open(root / "images" / f"{n}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            img = np.asarray(im)
        res.append((n, item["caption"], item["annotation"], img))
    return res


def _objects(annotation: dict) -> list[str]:
    """The per-object phrases: 'SIZE COLOUR SHAPE'."""
    return [p for p in annotation if len(p.split()) == 3]


# ----------------------------------------------------------------------------------------------- tests
def test_layout_and_plain_types(ab):
    man, out = ab
    root = out / "align_bench"
    assert man["paths"]["align_bench"] == str(root)
    n = KW["align_items"]
    assert man["align_bench"]["items"] == n and man["align_bench"]["image_size"] == 2 * KW["image_size"]
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(f"{i}.jpg" for i in range(n))
    assert sorted(p.name for p in (root / "pkls").iterdir()) == sorted(f"{i}.pkl" for i in range(n))
    on_disk = {json.loads((out / demo_data.MANIFEST).read_text())["files"].get(f"align_bench/{sub}/{i}.{ext}")
               for sub, ext in (("images", "jpg"), ("pkls", "pkl")) for i in range(n)}
    assert None not in on_disk  # every item file is in the manifest (so a missing one forces a rebuild)
    assert json.loads((out / demo_data.MANIFEST).read_text())["args"]["align_items"] == n
    for i in range(n):
        data = (root / "pkls" / f"{i}.pkl").read_bytes()
        assert data[:2] == b"\x80\x04"  # protocol 4
        item = _load(data)
        _plain(item)
        assert set(item) == {"caption", "annotation"} and type(item["caption"]) is str and item["annotation"]
        for phrase, regions in item["annotation"].items():
            assert type(regions) is list and regions
            for r in regions:
                assert set(r) == {"bbox_mask", "pixel_mask"}
                assert type(r["bbox_mask"]) is list and [type(v) for v in r["bbox_mask"]] == [int] * 4
                assert isinstance(r["pixel_mask"], np.ndarray)
    # the restriction is real: anything but numpy's array reconstruction is refused
    with pytest.raises(_Refused):
        _load(pickle.dumps(os.getcwd, protocol=4))
    with pytest.raises(_Refused):  # protocol 5 pickles arrays via numpy._core.numeric._frombuffer
        _load(pickle.dumps(np.zeros((2, 2), bool), protocol=5))


def test_captions_and_phrases(ab):
    _, out = ab
    colours, shapes, sizes = set(demo_data.COLORS), set(demo_data.SHAPES), set(demo_data.SIZES)
    for n, caption, ann, _ in _items(out):
        words = caption.split()
        # the demo's captions: "a SIZE COLOUR SHAPE RELATION a SIZE COLOUR SHAPE"
        assert len(words) in (9, 10) and words[0] == "a" and words[-4] == "a", caption
        rel = " ".join(words[4:-4])
        assert rel in demo_data.RELATIONS, caption
        objs = [words[1:4], words[-3:]]
        for sz, c, sh in objs:
            assert sz in sizes and c in colours and sh in shapes, caption
        assert _objects(ann) == [" ".join(o) for o in objs], (n, list(ann))
        for phrase in ann:
            pw = phrase.split()
            assert any(words[i:i + len(pw)] == pw for i in range(len(words) - len(pw) + 1)), (n, phrase, caption)
        singles = {p for p in ann if len(p.split()) == 1}
        unique_attr = {w for o in objs for w in o if words.count(w) == 1}
        assert singles == unique_attr, (n, caption, sorted(singles))  # every unambiguous word, no repeated one
        for w in singles:  # a word maps to its own object's region
            oi = 0 if w in objs[0] else 1
            assert ann[w][0]["bbox_mask"] == ann[" ".join(objs[oi])][0]["bbox_mask"]
            assert np.array_equal(ann[w][0]["pixel_mask"], ann[" ".join(objs[oi])][0]["pixel_mask"])


def test_masks_boxes_and_shapes(ab):
    _, out = ab
    side = 2 * KW["image_size"]
    fill = {s: [] for s in demo_data.SHAPES}
    for n, caption, ann, img in _items(out):
        h, w = img.shape[:2]
        assert (h, w) == (side, side)
        for phrase, regions in ann.items():
            for r in regions:
                x1, y1, x2, y2 = r["bbox_mask"]  # half-open: mask[y1:y2, x1:x2]
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (n, phrase, r["bbox_mask"])
                m = r["pixel_mask"]
                assert m.shape == (h, w) and m.dtype == np.bool_
                assert m.any() and not m[:y1].any() and not m[y2:].any(), (n, phrase)
                assert not m[:, :x1].any() and not m[:, x2:].any(), (n, phrase)
                # the shape touches all four sides of its box
                ys, xs = np.nonzero(m)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2), (n, phrase)
                if len(phrase.split()) == 3:
                    fill[phrase.split()[2]].append(m.sum() / ((x2 - x1) * (y2 - y1)))
    # the mask is the shape, not its box: a disc covers ~pi/4 of its box, a triangle / diamond ~1/2
    expect = {"square": (0.97, 1.0), "circle": (0.70, 0.86), "triangle": (0.4, 0.62), "diamond": (0.4, 0.62),
              "cross": (0.4, 0.75)}
    for shape, fr in fill.items():
        for f in fr:
            assert expect[shape][0] <= f <= expect[shape][1], (shape, f)
    assert sum(bool(v) for v in fill.values()) >= 4  # most shapes were exercised


def _grow(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for _ in range(k):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _shrink(m: np.ndarray, k: int) -> np.ndarray:
    return ~_grow(~m, k)


def test_masks_match_image_colours(ab):
    """Where an object's mask is set the JPEG shows that object's colour; away from it, not."""
    _, out = ab
    for n, caption, ann, img in _items(out):
        px = img.astype(float)
        objs = _objects(ann)
        masks = [ann[p][0]["pixel_mask"] for p in objs]
        near_any = _grow(masks[0] | masks[1], 2)
        for phrase, m in zip(objs, masks):
            rgb = np.asarray(demo_data.COLORS[phrase.split()[1]], float)
            close = np.linalg.norm(px - rgb, axis=-1) < 50
            inner = _shrink(m, 1)
            assert inner.sum() >= 20, (n, phrase)
            assert close[inner].mean() > 0.9, (n, phrase, close[inner].mean())  # JPEG 4:2:0 blurs edges
            assert np.linalg.norm(px[inner].mean(0) - rgb) < 25, (n, phrase, px[inner].mean(0))
            away = ~near_any
            assert close[away].mean() < 0.002, (n, phrase, close[away].mean())
            assert np.linalg.norm(px[away].mean(0) - rgb) > 80, (n, phrase)
            x1, y1, x2, y2 = ann[phrase][0]["bbox_mask"]
            rim = np.zeros_like(m)
            rim[y1:y2, x1:x2] = True
            rim &= ~_grow(m, 2)
            if rim.sum() >= 20:  # box corners outside the shape (circle, triangle, ...) show background
                assert close[rim].mean() < 0.02, (n, phrase, close[rim].mean())


def test_held_out_descriptions():
    args = demo_data.DemoArgs()  # the real train plan: 6000 draws of the 14160 two-object scenes
    descs = demo_data.plan_descs(args)
    align = demo_data.plan_align_descs(args, descs)
    assert len(align) == args.align_items == len(set(align))
    assert all(len(d) == 3 for d in align)
    assert not set(align) & set(descs["train/images"])
    with pytest.raises(ValueError):
        demo_data.plan_align_descs(demo_data.DemoArgs(align_items=-1), descs)


def test_deterministic_across_processes_and_rebuilt_on_change(tmp_path):
    """Byte-identical per seed, also in another process with another hash seed; another seed differs; a new
    align_items rebuilds the set and leaves no stale item behind."""
    kw = {**KW, "align_items": 10}
    a = demo_data.generate(tmp_path / "a", **kw)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from datasets import demo_data; "
            f"demo_data.generate({str(tmp_path / 'b')!r}, **{kw!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123"})
    demo_data.generate(tmp_path / "c", seed=1, **kw)

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    ta, tb, tc = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    align_files = sorted(rel for rel in ta if rel.startswith("align_bench/"))
    assert len(align_files) == 20 and set(align_files) <= set(a["files"])
    assert [rel for rel in ta if ta[rel] != tb.get(rel)] == [] and ta.keys() == tb.keys()
    assert all(ta[rel] != tc[rel] for rel in align_files if rel.endswith(".pkl"))

    fewer = demo_data.generate(tmp_path / "a", **{**kw, "align_items": 4})
    assert not fewer["reused"]
    assert sorted(p.name for p in (tmp_path / "a" / "align_bench" / "pkls").iterdir()) == [f"{i}.pkl" for i in
                                                                                           range(4)]
    assert sorted(p.name for p in (tmp_path / "a" / "align_bench" / "images").iterdir()) == [f"{i}.jpg" for i in
                                                                                             range(4)]
    t4 = tree(tmp_path / "a")
    assert all(t4[rel] == ta[rel] for rel in t4 if rel.startswith("align_bench/"))  # item N does not depend on count
    none = demo_data.generate(tmp_path / "a", **{**kw, "align_items": 0})
    assert none["paths"]["align_bench"] is None and not list((tmp_path / "a").rglob("*.pkl"))
