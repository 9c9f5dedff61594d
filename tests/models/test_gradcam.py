"""Grad-CAM of the ITM score (models/tasks/grounding.py) against a hand computation, and the proposal score on a
hand-placed heat map."""
import math

import pytest
import torch

from conftest import tiny_config
from models.objectives.itc import ItcConfig
from models.objectives.itm import ItmConfig
from models.tasks.grounding import box_scores, check_layer, itm_gradcam
from models.vlp import build_model


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = build_model(tiny_config(), {"itc": ItcConfig(), "itm": ItmConfig()}, tokenizer).eval()
    with torch.no_grad():   # a fresh ITM head is near zero everywhere: make the score depend on the image
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def inputs(tokenizer):
    torch.manual_seed(1)
    enc = tokenizer(["the red circle", "a small blue square left of the green cross", "it"], padding="max_length",
                    max_length=14, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def hand_cam(model, px, ids, mask, layer):
    """The definition, written out: the full graph, autograd.grad of the summed ITM positive logits on the
    returned attention, then per pair relu(grad) * att on the patch columns, summed over heads and real tokens by
    loops, divided by heads x tokens, reshaped to the grid."""
    with torch.enable_grad():
        image = model.encode_image(px)
        out = model.fuse(model.encode_text(ids, mask), mask, image, return_attention=True)
        att = out.text_to_image_attentions[layer]
        logits = model.itm_head(out.cls_feats)
        grad = torch.autograd.grad(logits[:, 1].sum(), att)[0]
    f = image.num_frames
    b, heads, _, nv = att.shape
    gh, gw = model.vision.grid_size
    cams = []
    for i in range(b):
        tokens = [t for t in range(ids.shape[1]) if mask[i, t] == 1]
        acc = torch.zeros(nv - f, dtype=torch.float64)
        for h in range(heads):
            for t in tokens:
                g, a = grad[i, h, t, f:].double(), att[i, h, t, f:].double()
                acc += torch.where(g > 0, g, torch.zeros_like(g)) * a
        cams.append((acc / (heads * len(tokens))).view(f, gh, gw))
    return torch.stack(cams), logits[:, 1].detach()


@pytest.mark.parametrize("layer, frames", [(0, 1), (-1, 1), (1, 2)])
def test_gradcam_equals_the_hand_computation(model, inputs, layer, frames):
    ids, mask = inputs
    torch.manual_seed(2)
    px = torch.randn(ids.shape[0], frames, 3, 32, 32)
    with torch.no_grad():   # as the engine's evaluation calls it
        got = itm_gradcam(model, px, ids, mask, layer)
        want, score = hand_cam(model, px, ids, mask, layer)
    assert got.cam.shape == (3, frames, 4, 4) and got.cam.dtype == torch.float32
    assert float(want.abs().max()) > 0   # a map that is not all zero
    torch.testing.assert_close(got.cam.double(), want, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.itm_score, score)
    assert all(p.grad is None for p in model.parameters())   # no parameter gradient touched
    assert not model.training


def test_rows_of_a_batch_do_not_interact(model, inputs):
    """The gradient of the summed scores is each pair's own: a pair scored alone gets the map it got in the batch."""
    ids, mask = inputs
    px = torch.randn(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = itm_gradcam(model, px, ids, mask, 0).cam
        alone = itm_gradcam(model, px[1:2], ids[1:2], mask[1:2], 0).cam
    torch.testing.assert_close(alone[0], full[1], rtol=1e-4, atol=1e-9)


def test_layer_index_is_checked():
    assert check_layer(-1, 6) == 5 and check_layer(2, 6) == 2
    with pytest.raises(ValueError, match="not a fusion layer"):
        check_layer(6, 6)
    with pytest.raises(ValueError, match="not a fusion layer"):
        check_layer(-7, 6)


def test_box_scores_on_a_hand_placed_heat_map():
    heat = torch.zeros(10, 12)
    heat[2:5, 3:7] = 1.0          # rows 2-4, columns 3-6: sum 12
    heat[9, 0] = 5.0              # a bottom-left pixel
    boxes = [(3, 2, 4, 3),        # exactly the hot block
             (0, 0, 12, 10),      # the whole image
             (8, 5, 3, 3),        # no heat
             (2.7, 1.9, 4.6, 3.4),  # rows int(1.9)..int(5.3) = 1..4, columns 2..6: the whole block
             (-3.5, 8, 6, 5),     # reaches outside: rows 8..9, columns 0..1 after clipping
             (4, 3, 1, 1)]        # one hot pixel
    for alpha in (0.5, 1.0):
        got = box_scores(heat, boxes, alpha)
        want = [12 / 12 ** alpha, 17 / 120 ** alpha, 0.0, 12 / (4.6 * 3.4) ** alpha, 5 / 30 ** alpha, 1.0]
        assert got.tolist() == pytest.approx(want, rel=1e-12)
    # alpha 1 is the mean heat in the box; ALBEF's 0.5 ranks the exact box first here, the mean too
    assert int(box_scores(heat, boxes, 0.5).argmax()) == 0
    assert box_scores(heat, boxes, 1.0)[0] == pytest.approx(1.0) and math.isclose(box_scores(heat, boxes, 1.0)[5], 1)
