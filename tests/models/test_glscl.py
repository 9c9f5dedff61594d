"""GLSCL objectives (MGSC, MLTC) and the masking they need, checked against the formulas of methods.md §1.3."""
import pytest
import torch

from conftest import glscl_objectives
from models.masking import mask_text_for_completion, random_keep_indices, random_token_mask
from models.objectives.glscl import GlsclPasses, MgscConfig, MltcConfig
from models.vision import VisionConfig, VisionEncoder, _video_block
from models.passes import StepContext

TAU = 0.03


def ref_nce(p, g, tau=TAU):
    """NormSoftmaxLoss written out: -mean diag log softmax(S) - mean diag log softmax(S^T), S = p^ g^T / tau."""
    p, g = p.float() / p.float().norm(dim=-1, keepdim=True), g.float() / g.float().norm(dim=-1, keepdim=True)
    s = p @ g.T / tau
    return -s.log_softmax(1).diagonal().mean() - s.T.log_softmax(1).diagonal().mean()


def small_vision():
    return VisionEncoder(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                      num_heads=3)).eval()


# ---------------------------------------------------------------- masking helpers

def test_random_keep_indices_count_sorted_distinct():
    g = torch.Generator().manual_seed(0)
    keep = random_keep_indices(64, 324, 1 - 0.8, generator=g)
    assert keep.shape == (64, 64)  # int(324 * 0.2) = 64 kept, as SCL/MAE
    assert (keep.diff(dim=1) > 0).all()  # sorted and distinct
    assert keep.min() >= 0 and keep.max() < 324
    assert len({tuple(r) for r in keep.tolist()}) == 64  # drawn per sample
    assert random_keep_indices(4, 16, 0.2).shape == (4, 3)  # 80% of 16 dropped -> 3 kept


def test_random_token_mask_exact_count():
    m = random_token_mask(50, 324, 0.3, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and (m.sum(1) == 97).all()  # int(324 * 0.3), the released code's mvm_masking
    assert (random_token_mask(3, 16, 0.3).sum(1) == 4).all()  # int(4.8): rounded down, as released
    assert (random_token_mask(3, 4, 0.01).sum(1) == 1).all()  # at least one
    assert len({tuple(r) for r in m.tolist()}) == 50


def test_text_completion_mask_exact_count_without_replacement(tokenizer):
    caps = ["a small red circle left of a large blue square and a green triangle", "a red circle", "dog", ""]
    enc = tokenizer(caps, padding="max_length", max_length=24, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(tokenizer.all_special_ids)
    masked, mask = mask_text_for_completion(ids, attn, special, tokenizer.mask_token_id, 0.4,
                                            generator=torch.Generator().manual_seed(0))
    cand = attn.bool() & ~torch.isin(ids, special)
    n = cand.sum(1)
    expected = torch.tensor([max(1, round(0.4 * k)) if k else 0 for k in n.tolist()])
    assert (mask.sum(1) == expected).all() and expected[-1] == 0
    assert not (mask & ~cand).any()  # never specials or padding
    assert (masked[mask] == tokenizer.mask_token_id).all()  # all become <mask>: no 80/10/10
    assert (masked[~mask] == ids[~mask]).all()


# ---------------------------------------------------------------- vision masking

@pytest.mark.parametrize("frames", [1, 3])
def test_mask_token_replaces_patch_embedding_before_position(frames):
    torch.manual_seed(0)
    enc = small_vision()
    x = torch.randn(2, frames, 3, 32, 32)
    tm = random_token_mask(2, enc.num_patches, 0.3)
    mt = torch.randn(1, 1, 48)
    plain, masked = enc.embed(x), enc.embed(x, token_mask=tm, mask_token=mt)
    for b in range(2):
        for f in range(frames):
            temporal = enc.temporal_embed[0, f] if frames > 1 else 0
            for p in range(enc.num_patches):
                got = masked[b, f, 1 + p]
                if tm[b, p]:  # tube: the same position is masked in every frame
                    torch.testing.assert_close(got, mt[0, 0] + enc.pos_embed[0, 1 + p] + temporal)
                else:
                    torch.testing.assert_close(got, plain[b, f, 1 + p])
    assert masked.shape == plain.shape
    out = enc(x, token_mask=tm, mask_token=mt)
    assert out.tokens.shape == enc(x).tokens.shape


def _manual_keep_forward(enc, x, keep):
    e = enc.embed(x)  # position (and temporal) embeddings already added
    b, f = e.shape[:2]
    rows = torch.stack([torch.stack([torch.cat([e[i, j, :1], e[i, j, 1:][keep[i]]]) for j in range(f)])
                        for i in range(b)])  # the same kept indices in every frame
    h = enc.norm_pre(rows)
    for blk in enc.blocks:
        h = blk(h.squeeze(1)).unsqueeze(1) if f == 1 else _video_block(blk, h)
    h = enc.norm(h)
    return torch.cat([h[:, :, 0], h[:, :, 1:].flatten(1, 2)], dim=1)


@pytest.mark.parametrize("frames", [1, 3])
def test_keep_drops_patches_after_position_embedding_tube(frames):
    torch.manual_seed(0)
    enc = small_vision()
    x = torch.randn(2, frames, 3, 32, 32)
    keep = random_keep_indices(2, enc.num_patches, 0.2)
    out = enc(x, keep=keep)
    assert out.num_frames == frames and out.tokens.shape == (2, frames + frames * 3, 48)
    torch.testing.assert_close(out.tokens, _manual_keep_forward(enc, x, keep), rtol=1e-5, atol=1e-5)
    everything = torch.arange(enc.num_patches).expand(2, -1)
    torch.testing.assert_close(enc(x, keep=everything).tokens, enc(x).tokens, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- objectives against the formulas

def _reference(model, b, cache):
    """Passes A, B, C recomputed from the model's modules with the masks the objectives drew."""
    pix, ids, attn = b["pixel_values"], b["input_ids"], b["attention_mask"]
    f = pix.shape[1]
    vis, fus = model.vision, model.fusion
    text_full = fus.project_text(model.text(ids, attn))
    image_full = fus.project_image(vis(pix).tokens)
    pa = fus(text_full, attn, fus.project_image(vis(pix, keep=cache["glscl_keep"]).tokens), f)
    pb = fus(fus.project_text(model.text(cache["glscl_masked_ids"], attn)), attn, image_full, f)
    mt = model.objectives["mltc"].mask_token
    pc = fus(text_full, attn, fus.project_image(vis(pix, token_mask=cache["mltc_token_mask"], mask_token=mt).tokens), f)
    return pa, pb, pc


def _ref_losses(model, b, cache, detach=True):
    sg = (lambda t: t.detach()) if detach else (lambda t: t)
    pa, pb, pc = _reference(model, b, cache)
    f, p = b["pixel_values"].shape[1], model.vision.num_patches
    mgsc = sum(ref_nce(pa.image[:, i], sg(pb.image[:, i])) for i in range(f)) / f
    mgsc = mgsc + ref_nce(pb.text[:, 0], sg(pa.text[:, 0]))
    pred_v, tgt_v = [], []
    tm = cache["mltc_token_mask"]
    for i in range(tm.shape[0]):
        for j in range(f):
            for k in range(p):
                if tm[i, k]:
                    pred_v.append(pc.image[i, f + j * p + k])
                    tgt_v.append(sg(pb.image[i, f + j * p + k]))
    mltc_image = 0.2 * ref_nce(torch.stack(pred_v), torch.stack(tgt_v))
    m = cache["glscl_text_mask"]
    mltc_text = 0.2 * ref_nce(pb.text[m], sg(pa.text[m]))
    return {"mgsc": mgsc, "mltc_image": mltc_image, "mltc_text": mltc_text}


@pytest.mark.parametrize("frames", [1, 2])
def test_mgsc_mltc_equal_formulas_and_only_predictions_get_gradient(model_factory, batch, tokenizer, frames):
    model = model_factory(objectives={"mgsc": MgscConfig(), "mltc": MltcConfig()}).eval()
    b = batch(frames=frames)
    ctx = StepContext(model, b)
    losses = {**model.objectives["mgsc"](ctx).losses, **model.objectives["mltc"](ctx).losses}
    passes = ctx.get(GlsclPasses)
    cache = {"glscl_keep": passes.keep, "glscl_masked_ids": passes.masked_ids, "glscl_text_mask": passes.text_mask,
             "mltc_token_mask": model.objectives["mltc"].last_token_mask}
    # masks: 80% of 16 patches dropped (3 kept), 30% token-masked (int(4.8) = 4), 40% of the real caption tokens masked
    assert cache["glscl_keep"].shape == (4, 3) and (cache["mltc_token_mask"].sum(1) == 4).all()
    cand = b["attention_mask"].bool() & ~torch.isin(b["input_ids"], torch.tensor(tokenizer.all_special_ids))
    expected = (0.4 * cand.sum(1).double()).round().clamp(min=1).long()
    assert (cache["glscl_text_mask"].sum(1) == expected).all()
    assert (cache["glscl_masked_ids"][cache["glscl_text_mask"]] == tokenizer.mask_token_id).all()

    ref = _ref_losses(model, b, cache)
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)

    def grads(loss):
        model.zero_grad()
        loss.backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for name in ref:  # the same gradients as the recomputation with detached targets ...
        got, want = grads(losses[name]), grads(ref[name])
        assert got.keys() == want.keys(), name
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-5, msg=f"{name}: {n}")  # float32 noise: 3e-6 seen
    # ... and not those of a version whose targets carry gradient (so the comparison above has power).
    undetached = _ref_losses(model, b, cache, detach=False)
    for name in ref:
        got, leaky = grads(losses[name]), grads(undetached[name])
        assert any(not torch.allclose(got[n], leaky[n], rtol=1e-3, atol=1e-6) for n in got), name


def test_passes_are_shared_and_unmasked_encodings_reused(model_factory, batch):
    model = model_factory(objectives={"mgsc": MgscConfig(), "mltc": MltcConfig()})
    calls = {"vision": 0, "text": 0, "fusion": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    out = model(batch())
    assert set(out["losses"]) == {"mgsc", "mltc_image", "mltc_text"}
    # vision: full, A (dropped), C (token-masked); text: full, masked; fusion: A, B, C
    assert calls == {"vision": 3, "text": 2, "fusion": 3}


def test_mltc_alone_uses_default_shared_ratios(model_factory, batch, tokenizer):
    """MGSC off: MLTC's shared passes A and B still mask with MGSC's defaults (80% of the patches dropped in A,
    exactly 40% of a caption's real words masked in B, drawn without replacement), and MLTC's losses are the formula
    on those passes."""
    model = model_factory(objectives={"mltc": MltcConfig()}).eval()
    b = batch()
    assert set(model(b)["losses"]) == {"mltc_image", "mltc_text"}
    ctx = StepContext(model, b)
    losses = model.objectives["mltc"](ctx).losses
    passes = ctx.get(GlsclPasses)
    p = model.vision.num_patches
    assert p == 16 and passes.keep.shape == (4, int(p * (1 - 0.8) + 1e-6))   # 3 of 16 patches kept
    ids, attn = b["input_ids"], b["attention_mask"]
    cand = attn.bool() & ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    expected = torch.tensor([max(1, round(0.4 * k)) if k else 0 for k in cand.sum(1).tolist()])
    assert (passes.text_mask.sum(1) == expected).all() and not (passes.text_mask & ~cand).any()
    assert (passes.masked_ids == ids.masked_fill(passes.text_mask, tokenizer.mask_token_id)).all()
    cache = {"glscl_keep": passes.keep, "glscl_masked_ids": passes.masked_ids, "glscl_text_mask": passes.text_mask,
             "mltc_token_mask": model.objectives["mltc"].last_token_mask}
    ref = _ref_losses(model, b, cache)   # passes A and B recomputed with these masks
    for name in ("mltc_image", "mltc_text"):
        torch.testing.assert_close(losses[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_parameter_gets_a_gradient_with_all_objectives(model_factory, batch):
    model = model_factory(objectives=glscl_objectives())
    for frames in (1, 2):
        model(batch(frames=frames))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []
    assert model.objectives["mltc"].mask_token.shape == (1, 1, 48)
    assert "objectives.mltc.mask_token" in model.no_weight_decay()
    assert all(p.dim() > 0 for p in model.parameters())  # ZeRO-3 cannot broadcast 0-dim parameters


def test_bf16_glscl_losses_are_finite(model_factory, batch):
    model = model_factory(objectives=glscl_objectives()).to(torch.bfloat16)
    out = model(batch(frames=2))
    assert set(out["losses"]) == {"itc", "itm", "mlm", "mgsc", "mltc_image", "mltc_text"}
    assert all(torch.isfinite(v.float()) and v.dtype == torch.float32 for k, v in out["losses"].items()
               if k.startswith("m") and k != "mlm")
    assert all(torch.isfinite(v.float()) for v in out["losses"].values())
    out["loss"].backward()


def test_smoke_all_losses_go_down_on_a_repeated_batch(model_factory, batch):
    """Smoke test: 30 AdamW steps on one fixed batch (same masks, negatives and dropout) lower every objective's
    loss, i.e. each loss reaches parameters that can reduce it. It does NOT check any loss's math: a wrong formula or
    target (e.g. MGSC's target replaced by its own prediction) still goes down. The formulas are
    checked by test_mgsc_mltc_equal_formulas_and_only_predictions_get_gradient, tests/models/test_objectives.py,
    tests/models/test_itm_mlm_reference.py and tests/train/test_glscl_two_ranks.py."""
    model = model_factory(objectives=glscl_objectives())
    b = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    history = []
    for _ in range(30):
        torch.manual_seed(0)  # the same masks / negatives / dropout every step: one fixed problem
        out = model(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out["losses"].items()})
    for name in ("itc", "itm", "mlm", "mgsc", "mltc_image", "mltc_text"):
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])


def test_text_completion_mask_with_replacement_follows_released_rule(tokenizer):
    """`text_mask_sampling: with_replacement`: int(0.4 n) + 1 draws with replacement, so at most that many distinct
    tokens (fewer when draws collide), never specials or padding."""
    torch.manual_seed(0)
    enc = tokenizer(["a small red circle left of a large blue square and a green triangle"] * 500 + ["a dog"],
                    padding="max_length", max_length=24, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(tokenizer.all_special_ids)
    masked, mask = mask_text_for_completion(ids, attn, special, tokenizer.mask_token_id, 0.4, with_replacement=True)
    candidates = attn.bool() & ~torch.isin(ids, special)
    n = candidates.sum(1)
    k = (0.4 * n).long() + 1
    per_sample = mask.sum(1)
    assert not (mask & ~candidates).any()
    assert (per_sample >= 1).all() and (per_sample <= k).all()
    assert (per_sample < k).any()  # collisions happen, unlike the exact rule
    assert (masked[mask] == tokenizer.mask_token_id).all() and (masked[~mask] == ids[~mask]).all()
