"""The NLVR2 and SNLI-VE heads (models/tasks/nlvr2.py, models/tasks/classify.py) and the modality-type rows they
need: the token-type table grown through train/finetune.py load_init from a file written here (the file's rows kept,
the new row a copy of the image row), the NLVR2 logits against an independent computation (one vision call per
image, two fusion calls with image types 1 and 2, the MLP written out from its parameters), swapping the images
changing them, and the SNLI-VE loss against cross-entropy computed here."""
import math

import pytest
import torch

from models.fusion import FusionConfig, FusionEncoder
from models.tasks.base import TaskModel
from models.tasks.classify import ImageTextClassifier
from models.tasks.nlvr2 import Nlvr2Head

from conftest import tiny_config


def nlvr2_model(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg.heads = []
    cfg.fusion.num_token_types = 3
    return TaskModel(cfg, Nlvr2Head(cfg.fusion.hidden_size))


def pair_batch(batch, b=4):
    one, two = batch(b=b, seed=0), batch(b=b, seed=1)
    out = dict(one)
    out["pixel_values"] = torch.stack([one["pixel_values"], two["pixel_values"]], dim=1)   # (B, 2, F, 3, H, W)
    out["labels"] = torch.tensor([1, 0, 1, 1][:b])
    return out


def mlp(seq, x):
    """Linear -> LayerNorm (biased variance, the module's eps) -> exact GELU -> Linear, from the parameters."""
    lin1, ln, _, lin2 = seq
    h = x @ lin1.weight.T + lin1.bias
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ lin2.weight.T + lin2.bias


def write_backbone_file(path, token_rows):
    """A whole-model file as convert_checkpoint.py writes one: a 2-type backbone's tensors (token table resized to
    `token_rows` rows) under kind "vlp" with its run config."""
    import dataclasses

    from models.weights import save_weights

    torch.manual_seed(5)
    cfg = tiny_config()
    cfg.heads = []
    sd = {k: v.clone() for k, v in TaskModel(cfg, torch.nn.Identity()).state_dict().items()}
    sd["fusion.token_type.weight"] = torch.randn(token_rows, cfg.fusion.hidden_size)
    cfg.fusion.num_token_types = token_rows
    save_weights(sd, str(path), {"kind": "vlp", "config": {"model": dataclasses.asdict(cfg)}})
    return sd


def test_default_two_types_keep_the_shape_and_the_forward():
    torch.manual_seed(0)
    enc = FusionEncoder(FusionConfig(hidden_size=32, num_layers=1, num_heads=4), 24, 16).eval()
    assert enc.token_type.weight.shape == (2, 32)
    t, v, m = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.ones(2, 5)
    torch.testing.assert_close(enc(t, m, v, 1).cls_feats, enc(t, m, v, 1, image_token_type=1).cls_feats)
    with pytest.raises(ValueError, match=r"image_token_type must be in \[1, 2\)"):
        enc(t, m, v, 1, image_token_type=2)
    with pytest.raises(ValueError, match="num_token_types must be >= 2"):
        FusionConfig(num_token_types=1).validate()


def test_image_type_2_adds_the_third_row():
    """Type 2 is row 2: the same as type 1 once row 2's values are put in row 1."""
    torch.manual_seed(0)
    enc = FusionEncoder(FusionConfig(hidden_size=32, num_layers=2, num_heads=4, num_token_types=3), 24, 16).eval()
    with torch.no_grad():
        enc.token_type.weight.copy_(torch.randn(3, 32))
    t, v, m = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.ones(2, 5)
    one, two = (enc(t, m, v, 1, image_token_type=k).cls_feats for k in (1, 2))
    assert (one - two).abs().max() > 1e-3
    with torch.no_grad():
        enc.token_type.weight[1] = enc.token_type.weight[2].clone()
    torch.testing.assert_close(two, enc(t, m, v, 1, image_token_type=1).cls_feats)


def test_load_init_grows_the_token_table_from_the_image_row(tmp_path, capsys):
    from train.finetune import load_init

    path = tmp_path / "init.safetensors"
    sd = write_backbone_file(path, 2)
    model = nlvr2_model(seed=1)
    out = load_init(model, str(path))
    rows = model.fusion.token_type.weight.detach()
    file_rows = sd["fusion.token_type.weight"]
    assert rows.shape == (3, model.cfg.fusion.hidden_size)
    torch.testing.assert_close(rows[:2], file_rows)         # the pretrained rows kept
    torch.testing.assert_close(rows[2], file_rows[1])       # the new one = the image row
    assert out["changes"] == ["fusion.token_type 2 -> 3 rows (new rows from the image row)"]
    assert "fusion.token_type 2 -> 3 rows (new rows from the image row)" in capsys.readouterr().out
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k != "fusion.token_type.weight")
    assert sorted({k.split(".")[1] for k in out["new"]}) == ["classifier"]


def test_load_init_refuses_a_file_with_more_types_than_the_model(tmp_path):
    from train.config import ConfigError
    from train.finetune import load_init

    path = tmp_path / "init3.safetensors"
    write_backbone_file(path, 3)
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.heads = []
    model = TaskModel(cfg, ImageTextClassifier(2 * cfg.fusion.hidden_size, 3, "snli_ve"))
    with pytest.raises(ConfigError, match=r"fusion\.token_type\.weight has shape \(3, 64\), the model needs \(2, 64\)"):
        load_init(model, str(path))


def test_nlvr2_logits_equal_two_typed_passes_and_see_both_images(batch):
    m = nlvr2_model().eval()
    with torch.no_grad():
        m.fusion.token_type.weight.copy_(torch.randn(3, m.cfg.fusion.hidden_size))   # three distinct rows
    b = pair_batch(batch)
    with torch.no_grad():
        logits = m.head.logits(m, b)
        text = m.encode_text(b["input_ids"], b["attention_mask"])
        feats = []
        for side, ttype in ((0, 1), (1, 2)):   # one vision call per image here (the head stacks them)
            image = m.encode_image(b["pixel_values"][:, side])
            feats.append(m.fuse(text, b["attention_mask"], image, image_token_type=ttype).cls_feats)
        expected = mlp(m.head.classifier, torch.cat(feats, -1))
        swapped = dict(b, pixel_values=b["pixel_values"].flip(1))
        other = m.head.logits(m, swapped)
        same_type = mlp(m.head.classifier, torch.cat(
            [m.fuse(text, b["attention_mask"], m.encode_image(b["pixel_values"][:, s]), image_token_type=1).cls_feats
             for s in (0, 1)], -1))
    assert logits.shape == (4, 2)
    assert m.head.classifier[0].in_features == 4 * m.cfg.fusion.hidden_size
    assert m.head.classifier[0].out_features == m.head.classifier[3].in_features == 2 * m.cfg.fusion.hidden_size
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (other - logits).abs().max() > 1e-3                # left and right are not interchangeable
    assert (same_type - logits).abs().max() > 1e-3            # the second pass uses type 2, not 1
    out = m(b)
    ce = -torch.log_softmax(expected.double(), -1)[torch.arange(4), b["labels"]].mean()
    assert set(out["losses"]) == {"nlvr2"} and out["loss"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_nlvr2_head_needs_the_pair_layout(batch):
    m = nlvr2_model().eval()
    with pytest.raises(ValueError, match=r"NLVR2 pixel_values must be \(B, 2, F, 3, H, W\)"):
        m.head.logits(m, batch(b=2))


def test_snli_ve_loss_is_cross_entropy_and_acc_the_argmax(batch):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.heads = []
    m = TaskModel(cfg, ImageTextClassifier(2 * cfg.fusion.hidden_size, 3, "snli_ve")).eval()
    b = batch(b=4)
    b["labels"] = torch.tensor([0, 2, 1, 2])
    out = m(b)
    with torch.no_grad():
        image = m.encode_image(b["pixel_values"])
        text = m.encode_text(b["input_ids"], b["attention_mask"])
        x = mlp(m.head.classifier, m.fuse(text, b["attention_mask"], image).cls_feats).double()
    assert x.shape == (4, 3) and m.head.classifier[0].in_features == 2 * cfg.fusion.hidden_size
    # -log softmax at the label, averaged over the batch
    ce = torch.stack([torch.logsumexp(x[i], 0) - x[i, y] for i, y in enumerate(b["labels"].tolist())]).mean()
    acc = sum(int(x[i].argmax()) == y for i, y in enumerate(b["labels"].tolist())) / 4
    assert set(out["losses"]) == {"snli_ve"}
    assert out["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["stats"]["snli_ve_acc"].item() == pytest.approx(acc)
    out["loss"].backward()
    assert m.head.classifier[0].weight.grad.abs().sum() > 0 and m.vision.patch_embed.proj.weight.grad is not None
