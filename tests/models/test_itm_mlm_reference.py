"""ITM and MLM losses of the real model (models/vlp.py build_model, tiny sizes, eval mode) against computations
written here from the backbone's public methods (encode_image / encode_text / fuse, the ITC embeddings) and the
heads' parameters.

ITM: the negatives are fixed by replacing the sampler's draw (and, for `pairs: b`, torch.randperm), and the sampler
is checked to receive what ALBEF-style hard negatives need: for images the image->text ITC similarities, for texts
the text->image ones, with identical captions forbidden. The expected pairs and labels are then spelled out here.
MLM: the masked ids and labels come in the batch (`mlm_input_ids` / `mlm_labels`, as the data workers provide them),
and the head (dense -> exact GELU -> LayerNorm -> decoder) and the cross entropy at the labelled positions are
recomputed."""
import math

import pytest
import torch

import models.objectives.itm as itm_module
from models.backbone import ImageTokens
from models.objectives.itc import ItcConfig
from models.objectives.itm import ItmConfig
from models.objectives.mlm import MlmConfig

B = 4
# captions 0 and 2 are identical: never each other's negative
CAPTIONS = ["a small red circle left of a large blue square", "a large green triangle",
            "a small red circle left of a large blue square", "an orange circle"]
NEG_TEXT = torch.tensor([1, 3, 1, 2])    # image i is paired with text NEG_TEXT[i] (allowed: not i, not its twin)
NEG_IMAGE = torch.tensor([3, 0, 3, 1])   # text i is paired with image NEG_IMAGE[i]
PERM = torch.tensor([2, 0, 3, 1])        # what torch.randperm(4) returns in `pairs: b`


def make_batch(tokenizer, frames=1):
    g = torch.Generator().manual_seed(0)
    enc = tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    return {"pixel_values": torch.randn(B, frames, 3, 32, 32, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


def ce(logits, labels):
    """Mean cross entropy written out."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp[torch.arange(len(labels)), labels].mean()


def grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, got_loss, want_loss):
    got, want = grads(model, got_loss), grads(model, want_loss)
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for n in want:
        # fp32 sums in another order: tolerance relative to the tensor's largest entry (and, for gradients that
        # are zero in exact arithmetic, e.g. attention key biases, to the largest gradient of the model)
        atol = max(1e-4 * want[n].abs().max().item(), 1e-6 * scale)
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=atol,
                                   msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------- ITM

def itm_model(model_factory, cfg):
    """The ITM head at init scores every pair about alike (logits ~ 0, loss ~ log 2 whatever the labels); a head
    drawn at a larger scale makes wrong pairs or labels visible in the loss."""
    model = model_factory(objectives={"itc": ItcConfig(), "itm": cfg}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.itm_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def expected_pairs(pairs, negative_side="both", neg_text=NEG_TEXT, neg_image=NEG_IMAGE):
    """[(text index, image index, label)] the ITM pass must score, from the negatives and PERM."""
    if pairs == "3b":   # B positives, then each image with its negative text, then each text with its negative image
        return ([(i, i, 1) for i in range(B)] + [(int(neg_text[i]), i, 0) for i in range(B)]
                + [(i, int(neg_image[i]), 0) for i in range(B)])
    if negative_side == "image":   # the released rule: the last B - B//2 of the permutation get another image
        negatives = {int(i): "image" for i in PERM[B // 2:]}
    else:   # B//2 negatives, the first half of them (rounded down) with another text, the rest another image
        first = PERM[: B // 2]
        negatives = {int(i): "text" for i in first[: len(first) // 2]}
        negatives.update({int(i): "image" for i in first[len(first) // 2:]})
    out = []
    for i in range(B):
        kind = negatives.get(i)
        out.append((int(neg_text[i]), i, 0) if kind == "text" else (i, int(neg_image[i]), 0) if kind == "image"
                   else (i, i, 1))
    return out


def fix_negatives(monkeypatch, model, batch):
    """Replace the negatives' draw: the sampler must be handed this batch's i2t (for negative texts) or t2i (for
    negative images) ITC similarities and the identical-caption mask; it returns NEG_TEXT / NEG_IMAGE."""
    with torch.no_grad():
        zi = model.embed_image(batch["pixel_values"])
        zt = model.embed_text(batch["input_ids"], batch["attention_mask"])
        tau = model.itc()[2]
        i2t, t2i = zi @ zt.T / tau, zt @ zi.T / tau
    ids = batch["input_ids"].tolist()
    forbidden = torch.tensor([[ids[i] == ids[j] for j in range(B)] for i in range(B)])
    assert forbidden.sum() == B + 2   # the twins
    calls = []

    def fake_sample_negatives(sim, forbid):
        assert torch.equal(forbid, forbidden)
        if torch.allclose(sim, i2t, rtol=1e-4, atol=1e-4):
            calls.append("text")
            return NEG_TEXT.clone()
        if torch.allclose(sim, t2i, rtol=1e-4, atol=1e-4):
            calls.append("image")
            return NEG_IMAGE.clone()
        raise AssertionError("the ITM sampler got neither the i2t nor the t2i ITC similarities")

    real_randperm = torch.randperm

    def fake_randperm(n, *args, **kwargs):
        if n == B:
            calls.append("randperm")
            return PERM.clone()
        return real_randperm(n, *args, **kwargs)

    monkeypatch.setattr(itm_module, "sample_negatives", fake_sample_negatives)
    monkeypatch.setattr(torch, "randperm", fake_randperm)
    return calls


def reference_itm(model, batch, pairs):
    frames = batch["pixel_values"].shape[1]
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encode_image(batch["pixel_values"]).tokens
    t, v, labels = (torch.tensor(x) for x in zip(*pairs))
    out = model.fuse(text[t], batch["attention_mask"][t], ImageTokens(image[v], frames))   # every token computed
    head = model.itm_head
    logits = out.cls_feats @ head.weight.T + head.bias
    return ce(logits, labels), (logits.argmax(-1) == labels).float().mean()


def itm_cases():
    cases = [("3b", "both", 1), ("3b", "both", 2), ("b", "both", 1)]
    if "negative_side" in ItmConfig.__dataclass_fields__:
        cases.append(("b", "image", 1))
    return cases


@pytest.mark.parametrize("pairs,negative_side,frames", itm_cases())
def test_itm_loss_equals_reference_with_fixed_negatives(model_factory, tokenizer, monkeypatch, pairs, negative_side,
                                                        frames):
    cfg = ItmConfig(pairs=pairs) if negative_side == "both" else ItmConfig(pairs=pairs, negative_side=negative_side)
    model = itm_model(model_factory, cfg)
    batch = make_batch(tokenizer, frames)
    calls = fix_negatives(monkeypatch, model, batch)
    out = model(batch)
    assert sorted(calls) == (["image", "text"] if pairs == "3b" else ["image", "randperm", "text"])
    want_pairs = expected_pairs(pairs, negative_side)
    assert sum(1 - lab for _, _, lab in want_pairs) == (2 * B if pairs == "3b" else B // 2 if negative_side == "both"
                                                       else B - B // 2)
    want, want_acc = reference_itm(model, batch, want_pairs)
    torch.testing.assert_close(out["losses"]["itm"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["stats"]["itm_acc"], want_acc)
    assert_same_grads(model, out["losses"]["itm"], want)


def test_itm_reference_has_power(model_factory, tokenizer):
    """Other pairings or labels give other losses on this batch, so the comparison above can tell them apart."""
    model = itm_model(model_factory, ItmConfig())
    batch = make_batch(tokenizer)
    with torch.no_grad():
        right = reference_itm(model, batch, expected_pairs("3b"))[0]
        flipped = reference_itm(model, batch, [(t, v, 1 - lab) for t, v, lab in expected_pairs("3b")])[0]
        # texts' negatives drawn with images' scores and vice versa
        swapped = reference_itm(model, batch, expected_pairs("3b", neg_text=NEG_IMAGE, neg_image=NEG_TEXT))[0]
    assert not math.isclose(right.item(), flipped.item(), rel_tol=1e-4)
    assert not math.isclose(right.item(), swapped.item(), rel_tol=1e-4)


# ---------------------------------------------------------------- MLM

def mlm_batch(tokenizer):
    """Per caption: its first real word -> [MASK], its second -> another (non-special) id, its third kept as is;
    all three labelled with the original id."""
    batch = make_batch(tokenizer)
    ids = batch["input_ids"]
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    for i in range(B):
        labels[i, 1:4] = ids[i, 1:4]
        masked[i, 1] = tokenizer.mask_token_id
        masked[i, 2] = 2000 + 17 * i   # a plain word piece id
    assert not torch.isin(masked[:, 2], torch.tensor(tokenizer.all_special_ids)).any()
    assert (batch["attention_mask"][:, :4] == 1).all()
    return {**batch, "mlm_input_ids": masked, "mlm_labels": labels}


def layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_mlm(model, batch):
    text = model.encode_text(batch["mlm_input_ids"], batch["attention_mask"])   # the MASKED text is encoded
    image = model.encode_image(batch["pixel_values"])
    out = model.fuse(text, batch["attention_mask"], image)
    where = batch["mlm_labels"] != -100
    head = model.objectives["mlm"].head
    dense, norm = head.transform[0], head.transform[2]
    h = out.text[where] @ dense.weight.T + dense.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))                    # exact GELU
    h = layer_norm(h, norm.weight, norm.bias)
    logits = h @ head.decoder.weight.T + head.decoder.bias
    target = batch["mlm_labels"][where]
    return ce(logits, target), (logits.argmax(-1) == target).float().mean()


def test_mlm_loss_equals_reference_with_fixed_mask(model_factory, tokenizer):
    model = model_factory(objectives={"mlm": MlmConfig()}).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # a head whose LayerNorm and biases are not the identity / zero of the init
        for p in model.objectives["mlm"].head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    batch = mlm_batch(tokenizer)
    out = model(batch)
    want, want_acc = reference_mlm(model, batch)
    torch.testing.assert_close(out["losses"]["mlm"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["stats"]["mlm_acc"], want_acc)
    assert_same_grads(model, out["losses"]["mlm"], want)
    # power: encoding the unmasked text instead, or predicting only the [MASK] positions, gives another loss
    with torch.no_grad():
        unmasked = reference_mlm(model, {**batch, "mlm_input_ids": batch["input_ids"]})[0]
        only_mask = batch["mlm_labels"].clone()
        only_mask[:, 2:4] = -100
        fewer = reference_mlm(model, {**batch, "mlm_labels": only_mask})[0]
    assert not math.isclose(want.item(), unmasked.item(), rel_tol=1e-4)
    assert not math.isclose(want.item(), fewer.item(), rel_tol=1e-4)
