"""VQA head (models/tasks/vqa.py) in a TaskModel: logits from the fusion's pooled features, the loss equal to an
independent soft-target BCE summed over answers and averaged over questions, the train score, gradients reaching
every tower, and the BERT-style init."""
import pytest
import torch

from models.tasks.base import TaskModel
from models.tasks.vqa import VqaHead

from conftest import tiny_config

NUM_ANSWERS = 7


@pytest.fixture
def vqa_model():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.heads = []
    return TaskModel(cfg, VqaHead(2 * cfg.fusion.hidden_size, NUM_ANSWERS))


@pytest.fixture
def vqa_batch(batch):
    b = batch(b=4)
    t = torch.zeros(4, NUM_ANSWERS)
    t[0, 2], t[0, 5] = 1.0, 0.3
    t[1, 0] = 0.9
    t[2, 6], t[2, 1], t[2, 3] = 0.6, 0.3, 0.3
    b["vqa_targets"] = t                 # row 3: no answer in the vocabulary, all zeros
    return b


def test_no_backbone_heads_and_logits_from_the_pooled_cls_features(vqa_model, vqa_batch):
    m = vqa_model.eval()
    assert m.heads == [] and not hasattr(m, "itc") and not hasattr(m, "itm_head")
    with torch.no_grad():
        logits = m.head.logits(m, vqa_batch)
        # by hand: both CLS tokens of the last fusion layer, concatenated, through the classifier
        img = m.encode_image(vqa_batch["pixel_values"])
        txt = m.encode_text(vqa_batch["input_ids"], vqa_batch["attention_mask"])
        fused = m.fuse(txt, vqa_batch["attention_mask"], img)          # every token computed
        pooled = torch.cat([m.fusion.text_pooler(fused.text[:, 0]), m.fusion.image_pooler(fused.image[:, 0])], -1)
        lin1, ln, act, lin2 = m.head.classifier
        expected = lin2(act(ln(lin1(pooled))))
    assert logits.shape == (4, NUM_ANSWERS)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_loss_is_bce_times_num_answers_and_score_is_the_argmax_target(vqa_model, vqa_batch):
    m = vqa_model.eval()    # no dropout: the forward's logits equal head.logits'
    out = m(vqa_batch)
    with torch.no_grad():
        x = m.head.logits(m, vqa_batch).double()
    t = vqa_batch["vqa_targets"].double()
    # -[t log s(x) + (1 - t) log(1 - s(x))], with log(1 - s(x)) = log s(-x); summed over answers, mean over rows
    per_entry = -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(torch.sigmoid(-x)))
    expected = per_entry.sum() / x.shape[0]
    assert set(out["losses"]) == {"vqa"}
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    picks = [t[i, int(x[i].argmax())].item() for i in range(4)]
    assert out["stats"]["vqa_train_score"].item() == pytest.approx(sum(picks) / 4)
    # with the answer forced to index 2, the score is row 0's 1.0 only
    with torch.no_grad():
        m.head.classifier[-1].bias[2] = 100.0
    assert m(vqa_batch)["stats"]["vqa_train_score"].item() == pytest.approx(1.0 / 4)


def test_gradient_reaches_every_part(vqa_model, vqa_batch):
    m = vqa_model.train()
    m(vqa_batch)["loss"].backward()
    for prefix in ("vision.", "text.", "fusion.", "head.classifier.0.", "head.classifier.3."):
        grads = [p.grad for n, p in m.named_parameters() if n.startswith(prefix)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_init_and_bad_targets(vqa_model, vqa_batch):
    lin1, ln, _, lin2 = vqa_model.head.classifier
    for lin in (lin1, lin2):
        assert torch.count_nonzero(lin.bias) == 0
        assert 0.015 < lin.weight.std().item() < 0.025
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    vqa_batch["vqa_targets"] = torch.zeros(4, NUM_ANSWERS + 1)
    with pytest.raises(ValueError, match="vqa_targets"):
        vqa_model(vqa_batch)
