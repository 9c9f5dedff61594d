"""train/grounding_eval.py: IoU, the eval geometry (boxes and heat maps against the real image reader), top-proposal
accuracy on a hand-built case, and 2 ranks (gloo) giving what 1 rank gives."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import train.grounding_eval as GE
from conftest import spawn_ranks, tiny_model_config
from datasets.batch import INDEX, VALID, to_device
from datasets.grounding import IMAGE_SIZE, GroundingItem, read_eval_image
from models.tasks.grounding import GradCam


def test_iou_on_hand_built_boxes():
    # the refer toolkit's convention: pixel spans x .. x + w - 1 inclusive; union from the w * h areas
    assert GE.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert GE.box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)    # columns 5..9 x rows 0..9
    assert GE.box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(16 / 100)      # inside
    assert GE.box_iou((0, 0, 10, 10), (10, 0, 10, 10)) == 0.0                        # side by side
    assert GE.box_iou((0, 0, 10, 10), (9, 9, 10, 10)) == 0.0                         # one shared pixel: empty span
    assert GE.box_iou((0.5, 0.5, 3, 3), (1, 1, 3, 3)) == pytest.approx(2.5 ** 2 / (18 - 2.5 ** 2))
    assert GE.box_iou((1, 1, 3, 3), (0.5, 0.5, 3, 3)) == GE.box_iou((0.5, 0.5, 3, 3), (1, 1, 3, 3))


@pytest.mark.parametrize("mode, want", [("square", (10, 10, 14, 10)),     # x / 3, y / 2
                                        ("crop", (5, 10, 21, 10))])       # (x - 20) / 2, y / 2
def test_box_mapping_matches_the_eval_transform(tmp_path, mode, want):
    """A white box drawn on a 120 x 80 image lands in the 40 x 40 model input where box_to_input says."""
    box = (30, 20, 42, 20)                                                 # xywh: columns 30..71, rows 20..39
    img = Image.new("RGB", (120, 80), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1], fill=(255,) * 3)
    img.save(tmp_path / "r.png")
    px, (w, h) = read_eval_image(str(tmp_path / "r.png"), 40, mode)
    mapped = GE.box_to_input(box, w, h, 40, mode)
    assert mapped == pytest.approx(want)
    ys, xs = np.nonzero(px[0, 0].numpy() > 128)
    assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == want


@pytest.mark.parametrize("mode", ["square", "crop"])
def test_heat_goes_back_where_the_input_pixels_came_from(mode):
    """A hot grid cell of a 4 x 4 map over a 40 x 40 input of a 120 x 80 image: the heat peaks inside that cell's
    region of the original image (box_to_input inverted by hand), and in crop mode nothing lies outside the crop."""
    cam = torch.zeros(4, 4)
    cam[1, 2] = 1.0                                                    # input pixels x 20..29, y 10..19
    heat = GE.heat_on_image(cam, 120, 80, mode)
    assert heat.shape == (80, 120)
    region = {"square": (60, 90, 20, 40), "crop": (60, 80, 20, 40)}[mode]   # x0, x1, y0, y1 in the image
    y, x = divmod(int(heat.argmax()), 120)
    assert region[0] <= x < region[1] and region[2] <= y < region[3]
    if mode == "crop":
        assert heat[:, :20].abs().max() == 0 and heat[:, 100:].abs().max() == 0
        assert heat[:, 20:100].abs().max() > 0


def _item(split, box, proposals):
    return GroundingItem("unused.jpg", "x", "0", "0", split, tuple(box), tuple(tuple(p) for p in proposals))


def test_top_proposal_accuracy_on_a_hand_built_case(monkeypatch):
    """Hand cams with one hot cell each; the model input is the whole 40 x 40 image (cells of 10 px). Proposals:
    the hot cell's box, a box elsewhere, a huge box holding the cell. Hits worked out by hand below."""
    hot = {0: (0, 0), 1: (3, 3), 2: (1, 2), 3: (2, 0), 4: (0, 3)}      # item -> hot cell (row, col)
    cell = lambda r, c: (c * 10, r * 10, 10, 10)   # noqa: E731
    items = [
        _item("val", cell(0, 0), [cell(3, 3), cell(0, 0), (0, 0, 40, 40)]),   # picks cell(0,0): hit
        _item("val", cell(0, 0), [cell(3, 3), cell(0, 0)]),                   # picks cell(3,3): miss
        _item("testA", cell(1, 2), [(0, 0, 40, 40), cell(1, 2)]),             # the exact cell beats the whole
        _item("testA", cell(2, 0), [cell(2, 0), (18, 18, 4, 4)]),             # never scored (below): a miss
        _item("testB", cell(0, 3), [(25, 0, 15, 12), cell(3, 0)]),            # near box, IoU 100/180 >= 0.5: hit
    ]

    def fake_gradcam(model, pixel_values, input_ids, attention_mask, layer):
        cams = torch.zeros(len(input_ids), 1, 4, 4)
        for row, i in enumerate(input_ids[:, 0].tolist()):
            cams[row, 0][hot[i]] = 1.0
        return GradCam(cams, torch.zeros(len(input_ids)))

    monkeypatch.setattr(GE, "itm_gradcam", fake_gradcam)
    # batches as eval_batches gives them: the item index travels in input_ids[:, 0]; row 2 of the second batch is
    # padding (VALID False); item 3 is never seen (its image failed to load): a miss
    batches = [{"pixel_values": torch.zeros(2, 1, 3, 4, 4), "input_ids": torch.tensor([[0], [1]]),
                "attention_mask": torch.ones(2, 1), INDEX: torch.tensor([0, 1]), VALID: torch.tensor([True, True]),
                IMAGE_SIZE: torch.tensor([[40, 40]] * 2)},
               {"pixel_values": torch.zeros(3, 1, 3, 4, 4), "input_ids": torch.tensor([[2], [4], [2]]),
                "attention_mask": torch.ones(3, 1), INDEX: torch.tensor([2, 4, -1]),
                VALID: torch.tensor([True, True, False]), IMAGE_SIZE: torch.tensor([[40, 40]] * 3)}]
    model = torch.nn.Linear(1, 1)
    ev = GE.evaluate_grounding(model, batches, lambda b: b, items, ["val", "testA", "testB"], keep_maps=2)
    assert {i: r.pred for i, r in ev.results.items()} == {0: 1, 1: 0, 2: 1, 4: 0}
    assert ev.results[4].iou == pytest.approx(100 / 180)
    m = ev.metrics
    assert (m["val_acc"], m["testA_acc"], m["testB_acc"]) == (0.5, 0.5, 1.0)
    assert m["grounding_acc"] == pytest.approx(2 / 3) and m["grounding_missing"] == 1 and m["grounding_items"] == 5
    assert sorted(ev.maps) == [0, 1] and ev.maps[1][3, 3] == 1.0


# ------------------------------------------------------------------------------------------------ 2 ranks
N_ITEMS = 13   # odd: rank 1 gets a padding row


def _setup(demo_root):
    from datasets.config import DataConfig
    from datasets.demo_grounding import FILES, IMAGE_ROOT
    from datasets.grounding import GroundingEvalSet, read_dets, read_grounding_eval, read_refs
    from models.objectives.itc import ItcConfig
    from models.objectives.itm import ItmConfig
    from models.text import TextConfig, load_tokenizer
    from models.vlp import build_model

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), {"itc": ItcConfig(), "itm": ItmConfig()}, tok).eval()
    d = os.path.join(demo_root, "grounding")
    items, _ = read_grounding_eval([os.path.join(demo_root, FILES["val"]), os.path.join(demo_root, FILES["test"])],
                                   os.path.join(demo_root, IMAGE_ROOT), read_refs(os.path.join(demo_root, FILES["refs"])),
                                   read_dets(os.path.join(demo_root, FILES["dets"]))[0])
    items = items[:8] + [it for it in items if it.split == "testA"][:N_ITEMS - 8]
    assert os.path.isdir(d) and len(items) == N_ITEMS
    cfg = DataConfig(image_size=32, max_text_len=16)
    return model, items, GroundingEvalSet(items, cfg, tok, "square")


def _run(model, items, data, rank, world):
    from datasets.task_loader import eval_batches

    batches = eval_batches(data, 4, rank=rank, world_size=world, shard=True)
    return GE.evaluate_grounding(model, batches, lambda b: to_device(b, "cpu", torch.float32), items,
                                 ["val", "testA"], layer=0, world_size=world, keep_maps=5)


def _worker(rank, port, out_dir, demo_root):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, items, data = _setup(demo_root)
        ev = _run(model, items, data, rank, 2)
        results = {k: tuple(v) for k, v in ev.results.items()}   # plain tuples: read back with weights_only=True
        torch.save({"metrics": ev.metrics, "results": results, "maps": ev.maps}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank(tmp_path):
    from datasets.demo_grounding import write_grounding

    demo_root = str(tmp_path / "demo")
    write_grounding(demo_root, seed=0, image_size=32)
    spawn_ranks(_worker, 2, str(tmp_path), demo_root)
    model, items, data = _setup(demo_root)
    one = _run(model, items, data, 0, 1)
    assert len(one.results) == N_ITEMS and sorted(one.maps) == [0, 1, 2, 3, 4]
    assert {r.pred for r in one.results.values()} != {0}   # not a degenerate all-first choice
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["metrics"] == one.metrics, r
        assert got["results"] == dict(one.results), r
        assert sorted(got["maps"]) == sorted(one.maps)
        for i, cam in one.maps.items():
            torch.testing.assert_close(got["maps"][i], cam, rtol=1e-5, atol=1e-9)
