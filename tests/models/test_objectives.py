import math

import pytest
import torch
import torch.nn.functional as F

from models.backbone import ImageTokens
from models.objectives.itc import ItcConfig
from models.objectives.itm import ITM, ItmConfig, sample_negatives
from models.objectives.mlm import MlmConfig


def test_every_parameter_gets_a_gradient(model_factory, batch):
    model = model_factory()
    for frames in (1, 2):  # the temporal embedding only works on videos
        out = model(batch(frames=frames))
        out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_total_is_weighted_sum_of_named_losses(model_factory, batch):
    model = model_factory(objectives={"itc": ItcConfig(weight=0.5), "itm": ItmConfig(weight=2.0),
                                      "mlm": MlmConfig(weight=1.0)})
    torch.manual_seed(1)
    out = model(batch())
    l = out["losses"]
    assert set(l) == {"itc", "itm", "mlm"}
    torch.testing.assert_close(out["loss"], 0.5 * l["itc"] + 2.0 * l["itm"] + l["mlm"])


def test_itc_equals_formula(model_factory, batch):
    model = model_factory().eval()
    b = batch()
    out = model(b)
    zi = model.embed_image(b["pixel_values"])
    zt = model.embed_text(b["input_ids"], b["attention_mask"])
    logits = zi @ zt.T / 0.07
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out["losses"]["itc"], expected, rtol=1e-4, atol=1e-5)


class FakeTwoRankGather:
    """Rank 1 of 2, where rank 0 holds the given tensor: what a real all-gather returns on rank 1."""
    rank, world_size = 1, 2

    def __init__(self, other):
        self.other = other

    def __call__(self, t):
        return torch.cat([self.other(t), t])


def test_itc_uses_gathered_columns_and_rank_offset(model_factory, batch):
    model = model_factory().eval()
    b = batch()
    zi = model.embed_image(b["pixel_values"])
    zt = model.embed_text(b["input_ids"], b["attention_mask"])
    rank0 = {"i": torch.randn(4, 32), "t": torch.randn(4, 32)}
    rank0 = {k: F.normalize(v, dim=-1) for k, v in rank0.items()}
    calls = iter([rank0["i"], rank0["t"]])
    model.set_gather(FakeTwoRankGather(lambda t: next(calls)))
    loss = model(b)["losses"]["itc"]
    all_t, all_i = torch.cat([rank0["t"], zt]), torch.cat([rank0["i"], zi])
    labels = torch.arange(4) + 4
    expected = (F.cross_entropy(zi @ all_t.T / 0.07, labels) + F.cross_entropy(zt @ all_i.T / 0.07, labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_itc_temperature_stays_in_range(model_factory):
    model = model_factory()
    itc = model.itc
    with torch.no_grad():
        itc.log_inv_temperature.fill_(math.log(1 / 1e-6))
    assert itc()[2].item() == pytest.approx(itc.cfg.min_temperature)
    with torch.no_grad():
        itc.log_inv_temperature.fill_(-5.0)
    assert itc()[2].item() == pytest.approx(itc.cfg.max_temperature)


def test_itm_negatives_avoid_forbidden_and_survive_degenerate_rows():
    torch.manual_seed(0)
    b = 6
    forbidden = torch.eye(b, dtype=torch.bool)
    forbidden[0, 1] = forbidden[1, 0] = True  # samples 0 and 1 share a caption
    sims = torch.randn(b, b)
    sims[2] = float("nan")
    sims[3] = float("inf")
    sims[4] = -1e9
    for _ in range(50):
        idx = sample_negatives(sims, forbidden)
        assert not forbidden[torch.arange(b), idx].any()
    idx = sample_negatives(None, torch.ones(2, 2, dtype=torch.bool))  # every caption identical: still works
    assert (idx == torch.tensor([1, 0])).all()


def test_itm_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    sims = torch.full((3, 3), -30.0)
    sims[0, 2] = sims[1, 0] = sims[2, 1] = 30.0
    idx = sample_negatives(sims, torch.eye(3, dtype=torch.bool))
    assert idx.tolist() == [2, 0, 1]


def test_itm_rejects_batch_of_one(model_factory, batch):
    with pytest.raises(ValueError, match="at least 2"):
        model_factory()(batch(b=1))


def test_mlm_with_nothing_selected_is_a_zero_loss_with_gradient(model_factory, batch):
    """The masking rule forces nothing: a batch where no token was selected trains on a zero MLM loss."""
    model = model_factory(objectives={"mlm": MlmConfig()})
    b = batch()
    out = model({**b, "mlm_input_ids": b["input_ids"], "mlm_labels": torch.full_like(b["input_ids"], -100)})
    assert out["losses"]["mlm"].item() == 0.0
    out["loss"].backward()   # still a graph: every rank takes part in the backward


def test_activation_checkpointing_gives_identical_loss_and_grads(model_factory, batch):
    b = batch(frames=2)
    grads = []
    for ckpt in (False, True):
        model = model_factory()
        for layers in model.layer_stacks().values():
            for layer in layers:
                layer.activation_checkpointing = ckpt
        torch.manual_seed(3)
        out = model(b)
        out["loss"].backward()
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_losses_are_finite(model_factory, batch):
    model = model_factory().to(torch.bfloat16)
    out = model(batch(frames=2))
    assert all(torch.isfinite(v.float()) for v in out["losses"].values())
    out["loss"].backward()


def test_pretrained_minilm_model_builds(model_factory, batch):
    model = model_factory(pretrained_text=True)
    out = model(batch())
    assert torch.isfinite(out["loss"])


class _FakeItmCtx:
    """What ITM reads from a StepContext; the model's `fuse` records its inputs and scores each pair as matched or
    not; no contrastive scores are published (uniform negatives)."""

    def __init__(self, ids):
        from types import SimpleNamespace
        b = ids.shape[0]
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)
        self.text = torch.arange(b, dtype=torch.float)[:, None, None].expand(b, 3, 1).clone()   # row i = i
        self.fusion_text = self.text   # the co-attention family fuses the text encoding itself
        self.image = ImageTokens(torch.arange(b, dtype=torch.float)[:, None, None].expand(b, 5, 1).clone(), 1)
        self.num_frames = 1
        self.calls = []
        head = torch.nn.Linear(2, 2)
        with torch.no_grad():  # logits = cls_feats: class 1 iff the pair is matched
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
        self.model = SimpleNamespace(fuse=self.fuse, itm_head=head)

    def get(self, kind):
        return None

    def fuse(self, text, text_mask, image, **kw):
        from types import SimpleNamespace
        self.calls.append((text, text_mask, image.tokens))
        matched = (text[:, 0, 0] == image.tokens[:, 0, 0]).float()
        return SimpleNamespace(cls_feats=torch.stack([1 - matched, matched], 1) * 10)  # 2*dim = 2 features


def _itm_b_mode():
    return ITM(ItmConfig(pairs="b"), env=None)


@pytest.mark.parametrize("b", [2, 3, 6, 9])
def test_itm_b_mode_one_call_of_b_pairs_with_half_negatives(b):
    torch.manual_seed(b)
    ids = torch.arange(b * 4).view(b, 4) + 5
    if b > 2:  # samples 0 and 1 share a caption: never each other's negative text or image
        ids[1] = ids[0]
    itm = _itm_b_mode()
    for _ in range(20):
        ctx = _FakeItmCtx(ids)
        out = itm(ctx)
        assert len(ctx.calls) == 1
        text, mask, image = ctx.calls[0]
        assert text.shape[0] == mask.shape[0] == image.shape[0] == b
        t, i = text[:, 0, 0].long(), image[:, 0, 0].long()
        rows = torch.arange(b)
        neg_text, neg_image = t != rows, i != rows
        assert not (neg_text & neg_image).any()            # one swap per negative pair
        assert int((neg_text | neg_image).sum()) == b // 2  # exactly B//2 negatives
        assert int(neg_text.sum()) == (b // 2) // 2
        assert all((ids[t[k]] != ids[k]).any() for k in range(b) if neg_text[k])   # really another caption
        assert all((ids[i[k]] != ids[k]).any() for k in range(b) if neg_image[k])  # image of another caption
        assert out.stats["itm_acc"].item() == 1.0  # labels: 1 exactly for the kept positives


def test_itm_3b_mode_unchanged():
    assert ItmConfig().pairs == "3b"
    b = 4
    ids = torch.arange(b * 4).view(b, 4)
    itm = ITM(ItmConfig(), env=None)
    ctx = _FakeItmCtx(ids)
    out = itm(ctx)
    assert len(ctx.calls) == 1
    text, _, image = ctx.calls[0]
    t, i = text[:, 0, 0].long(), image[:, 0, 0].long()
    rows = torch.arange(b)
    assert t.shape[0] == 3 * b
    assert (t[:b] == rows).all() and (i[:b] == rows).all()              # positives
    assert (t[b:2 * b] != rows).all() and (i[b:2 * b] == rows).all()    # negative texts
    assert (t[2 * b:] == rows).all() and (i[2 * b:] != rows).all()      # negative images
    assert out.stats["itm_acc"].item() == 1.0


def test_itm_b_mode_in_model_one_fusion_call(model_factory, batch):
    model = model_factory(objectives={"itc": ItcConfig(), "itm": ItmConfig(pairs="b")})
    shapes = []
    model.fusion.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[0]))
    out = model(batch(b=4))
    assert shapes == [4]
    out["loss"].backward()
    assert torch.isfinite(out["losses"]["itm"])


def test_mlm_uses_collator_masks_when_the_batch_has_them(model_factory, batch):
    """data.mlm_probability: the workers mask; the objective must predict exactly the collator's labels."""
    model = model_factory(objectives={"mlm": MlmConfig()}).eval()
    batch = batch()
    ids = batch["input_ids"].clone()
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]  # one chosen position per caption, replaced by the mask token
    masked = ids.clone()
    masked[:, 1] = model.objectives["mlm"].mask_token_id
    seen = []
    model.objectives["mlm"].head.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    out = model({**batch, "mlm_input_ids": masked, "mlm_labels": labels})
    assert seen == [ids.shape[0]]  # logits at exactly the collator's masked positions
    torch.manual_seed(0)
    out2 = model({**batch, "mlm_input_ids": masked, "mlm_labels": labels})
    torch.testing.assert_close(out["losses"]["mlm"], out2["losses"]["mlm"])  # no device-side random masking


def test_itc_with_image_ids_treats_every_caption_of_an_image_as_a_positive(model_factory, batch):
    """Retrieval fine-tuning (ALBEF's idx): samples 0 and 2 show one image, so each row's target is split evenly
    over its positives; without ids the same batch is the plain one-positive loss."""
    model = model_factory(objectives={"itc": ItcConfig()}).eval()
    b = batch()
    zi = model.embed_image(b["pixel_values"])
    zt = model.embed_text(b["input_ids"], b["attention_mask"])
    logits = zi @ zt.T / 0.07
    targets = torch.tensor([[.5, 0, .5, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 1]])
    want = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    got = model({**b, "image_ids": torch.tensor([7, 3, 7, 5])})["losses"]["itc"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = model({**b, "image_ids": torch.tensor([0, 1, 2, 3])})["losses"]["itc"]
    torch.testing.assert_close(plain, model(b)["losses"]["itc"], rtol=1e-5, atol=1e-6)


def test_itm_never_draws_another_caption_of_the_same_image_as_a_negative(model_factory, batch, monkeypatch):
    import models.objectives.itm as itm_mod

    seen = []
    real = itm_mod.sample_negatives
    monkeypatch.setattr(itm_mod, "sample_negatives", lambda sim, forbidden: seen.append(forbidden.clone()) or
                        real(sim, forbidden))
    model = model_factory(objectives={"itc": ItcConfig(), "itm": ItmConfig()})
    model({**batch(), "image_ids": torch.tensor([4, 4, 9, 4])})
    ids = torch.tensor([4, 4, 9, 4])
    same = ids[:, None] == ids[None, :]
    assert len(seen) == 2 and all((f | ~same).all() for f in seen)   # every same-image pair is forbidden
