"""SemMIM (models/objectives/semmim.py, methods.md §3) against computations written here.

Expected values are recomputed from the model's modules: the momentum fusion as a copy of the online FusionEncoder
loaded with the momentum weights (not the objective's layer loop), the prototype head and the losses in float64 by
hand (not the objective's helpers). Tiny coattention model with the ViT's mask token, dropout 0 (so train mode, in
which the centers move, is deterministic), online and momentum weights perturbed apart, centers set non-zero.
"""
import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import models.objectives.semmim as semmim_module
from conftest import all_objectives, glscl_objectives, make_batch
from models.backbone import ContrastiveHeadConfig, ModelConfig
from models.fusion import FusionConfig
from models.masking import text_guided_mask
from models.objectives.ita import ItaConfig
from models.objectives.semmim import SemMIM, SemmimConfig
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import build_model, check_families

K = 24


def semmim_model_config(mask_token=True) -> ModelConfig:
    return ModelConfig(
        VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                     mask_token=mask_token),
        TextConfig(tokenizer="minilm", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, dropout=0.0),
        FusionConfig(hidden_size=64, num_layers=2, num_heads=4, dropout=0.0), ContrastiveHeadConfig(embed_dim=32))


def small(**kw) -> SemmimConfig:
    return SemmimConfig(**{"num_prototypes": K, "proj_dim": 16, "proj_hidden": 40, **kw})


def build(tokenizer, objectives, seed=0, mask_token=True):
    torch.manual_seed(seed)
    return build_model(semmim_model_config(mask_token), objectives, tokenizer).train()


def perturb(model, seed=1, scale=0.05):
    """Online and momentum weights apart (as after EMA steps) and the centers non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in itertools.chain(model.parameters(), model.momentum.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g))
        centers = model.objectives["semmim"].centers
        centers.global_.copy_(0.3 * torch.randn(K, generator=g))
        centers.patch.copy_(0.3 * torch.randn(K, generator=g))
    return model


# ------------------------------------------------------------------------------------------------ references
def ref_head(head, x):
    """Linear-GELU-Linear-GELU-Linear, L2-normalise, cosine with the L2-normalised prototypes; float64."""
    lin = lambda i, h: h @ head.mlp[i].weight.double().T + head.mlp[i].bias.double()
    gelu = lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    z = lin(4, gelu(lin(2, gelu(lin(0, x.double())))))
    c = head.prototypes.double()
    return (z / z.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).T


def ref_ce(student, teacher, center, t_temp, s_temp):
    """mean over rows of -sum softmax((teacher - center) / t_temp) * log_softmax(student / s_temp), float64."""
    q = torch.softmax((teacher.double() - center.double()) / t_temp, dim=-1)
    s = student.double() / s_temp
    return -(q * (s - torch.logsumexp(s, dim=-1, keepdim=True))).sum(-1).mean()


def momentum_reference(model, b):
    """The momentum model on the full image and caption, through a FusionEncoder holding the momentum weights:
    -> (projected momentum image tokens, fusion output with attention maps)."""
    m = model.momentum
    ids, amask = b["input_ids"], b["attention_mask"]
    fusion = copy.deepcopy(model.fusion)
    for name in ("layers", "token_type", "image_in", "text_in"):
        getattr(fusion, name).load_state_dict(m.copy_of(f"fusion.{name}").state_dict())
    with torch.no_grad():
        image = fusion.project_image(m.copy_of("vision")(b["pixel_values"]).tokens)
        text = fusion.project_text(m.copy_of("text")(ids, amask))
        return image, fusion(text, amask, image, 1, return_attention=True)


def student_features(model, b, mask):
    """Online: the ViT with its mask token at `mask`, fused with the caption -> (projected tokens, image stream)."""
    ids, amask = b["input_ids"], b["attention_mask"]
    image = model.encode_image(b["pixel_values"], token_mask=mask).tokens
    text = model.fusion.project_text(model.text(ids, amask))
    return image, model.fusion(text, amask, image, 1).image


# ---------------------------------------------------------------------------------------- 1, 2: the two losses
@pytest.mark.parametrize("step, temp", [(None, 0.04), (5, 0.055)])   # teacher temperature 0.07 -> 0.04 ramp
def test_losses_and_center_update_equal_float64_reference(tokenizer, step, temp):
    cfg = small(agree_weight=0.7, mim_weight=1.3, weight=0.5, teacher_temp_start=0.07, teacher_temp_warmup_steps=10)
    model = perturb(build(tokenizer, {"semmim": cfg}))
    obj = model.objectives["semmim"]
    c_global, c_patch = obj.centers.global_.clone(), obj.centers.patch.clone()
    b = make_batch(tokenizer)
    b["step"] = step
    out = model(b)
    mask = obj.last_mask
    assert (mask.sum(1) == round(0.4 * 16)).all()   # 4 x 4 patches, 40%

    image_m, fused_m = momentum_reference(model, b)
    head_m = model.momentum.copy_of("objectives.semmim.head")
    with torch.no_grad():
        t_global = ref_head(head_m, image_m[:, 0])          # (B, K): the momentum ViT CLS, full view
        t_patch = ref_head(head_m, fused_m.image[:, 1:])    # (B, N, K): text-injected patch targets
        image, fused = student_features(model, b, mask)
        s_global = ref_head(obj.head, image[:, 0])
        s_patch = ref_head(obj.head, fused[:, 1:])
    agree = ref_ce(s_global, t_global, c_global, temp, 0.1)
    mim = ref_ce(s_patch[mask], t_patch[mask], c_patch, temp, 0.1)
    losses = out["losses"]
    torch.testing.assert_close(losses["semmim_agree"].double(), 0.7 * agree, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(losses["semmim_mim"].double(), 1.3 * mim, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out["loss"].double(), 0.5 * (0.7 * agree + 1.3 * mim), rtol=2e-5, atol=2e-6)
    # the collapse guard's statistics: usage of the batch-mean target and of the batch-mean student prediction
    # (exp of the entropy = effective number of prototypes), and the mean entropy of one target
    q = torch.softmax((t_patch[mask] - c_patch.double()) / temp, dim=-1)
    p = torch.softmax(s_patch[mask] / 0.1, dim=-1)
    h = lambda d: -(d * d.log()).sum(-1)
    stats = {k: v.double() for k, v in out["stats"].items()}
    torch.testing.assert_close(stats["semmim_effective_prototypes"], h(q.mean(0)).exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["semmim_student_effective_prototypes"], h(p.mean(0)).exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["semmim_target_entropy"], h(q).mean(), rtol=1e-5, atol=1e-5)
    # centers after the step: EMA 0.9 with the batch mean of the teacher logits (all patches for c_p)
    torch.testing.assert_close(obj.centers.global_.double(), 0.9 * c_global.double() + 0.1 * t_global.mean(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj.centers.patch.double(), 0.9 * c_patch.double() + 0.1 * t_patch.mean((0, 1)),
                               rtol=1e-5, atol=1e-6)


def ref_sinkhorn(teacher, t_temp, iters):
    """Sinkhorn-Knopp as a matrix scaling diag(u) P diag(v) of P = softmax(teacher / t_temp) (float64): v gives every
    prototype n / K of the mass, u makes every row sum to 1; `iters` rounds of (v, u), starting from u = 1."""
    p = torch.softmax(teacher.double() / t_temp, dim=-1)
    n, k = p.shape
    u = torch.ones(n, dtype=torch.float64)
    for _ in range(iters):
        v = (n / k) / (u @ p)
        u = 1 / (p @ v)
    return u[:, None] * p * v[None, :]


@pytest.mark.parametrize("iters", [3, 1])
def test_sinkhorn_centering_losses_equal_float64_reference(tokenizer, iters):
    """centering: sinkhorn: the teacher targets are the Sinkhorn-Knopp scaling of the sharpened teacher over the
    images (global) and over the masked patches (MIM); the EMA centers play no part in them."""
    cfg = small(centering="sinkhorn", sinkhorn_iters=iters, teacher_temp=0.05)
    model = perturb(build(tokenizer, {"semmim": cfg}))
    obj = model.objectives["semmim"]
    b = make_batch(tokenizer)
    out = model(b)
    mask = obj.last_mask
    image_m, fused_m = momentum_reference(model, b)
    head_m = model.momentum.copy_of("objectives.semmim.head")
    with torch.no_grad():
        q_global = ref_sinkhorn(ref_head(head_m, image_m[:, 0]), 0.05, iters)
        q_patch = ref_sinkhorn(ref_head(head_m, fused_m.image[:, 1:])[mask], 0.05, iters)
        image, fused = student_features(model, b, mask)
        s_global = torch.log_softmax(ref_head(obj.head, image[:, 0]) / 0.1, -1)
        s_patch = torch.log_softmax(ref_head(obj.head, fused[:, 1:])[mask] / 0.1, -1)
    torch.testing.assert_close(out["losses"]["semmim_agree"].double(), -(q_global * s_global).sum(-1).mean(),
                               rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out["losses"]["semmim_mim"].double(), -(q_patch * s_patch).sum(-1).mean(),
                               rtol=2e-5, atol=2e-6)


def test_sinkhorn_converges_to_equal_prototype_use():
    """Run long enough, Sinkhorn-Knopp balances the prototypes exactly: rows are distributions and every prototype
    gets n / K of them, even when every row prefers the same prototype (the collapse it guards against)."""
    n, k = 40, 8
    logits = 0.1 * torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    logits[:, 3] += 0.5   # every row's favourite
    q = semmim_module.sinkhorn(logits, 0.05, 200, lambda t: t)
    torch.testing.assert_close(q.sum(1), torch.ones(n))
    torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), rtol=1e-4, atol=1e-4)
    assert (q.argmax(1) == 3).float().mean() < 0.5   # no longer one prototype for all
    plain = torch.softmax(logits / 0.05, -1)
    assert (plain.argmax(1) == 3).all()


def test_centers_do_not_move_in_eval_mode(tokenizer):
    model = perturb(build(tokenizer, {"semmim": small()})).eval()
    before = {k: v.clone() for k, v in model.objectives["semmim"].centers.state_dict().items()}
    model(make_batch(tokenizer))
    after = model.objectives["semmim"].centers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("relevance", ["cls", "words"])
def test_mask_is_drawn_from_the_momentum_text_to_patch_attention(tokenizer, monkeypatch, relevance):
    model = perturb(build(tokenizer, {"semmim": small(relevance=relevance, text_guided_ratio=0.75)}))
    seen = {}

    def spy(rel, num_masked, guided_ratio, generator=None):
        seen.update(rel=rel, num_masked=num_masked, guided_ratio=guided_ratio)
        return text_guided_mask(rel, num_masked, guided_ratio, generator)

    monkeypatch.setattr(semmim_module, "text_guided_mask", spy)
    captions = ["a small red circle left of a large blue square", "a large green triangle", "a blue square", ""]
    b = make_batch(tokenizer)
    enc = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")
    b.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    model(b)
    _, fused_m = momentum_reference(model, b)
    att = fused_m.text_to_image_attentions[-1].double().mean(1)[..., 1:]   # (B, Lt, N), heads averaged
    special = torch.tensor(tokenizer.all_special_ids)
    expected = []
    for i in range(len(captions)):
        words = (b["attention_mask"][i].bool() & ~torch.isin(b["input_ids"][i], special)).nonzero()[:, 0]
        use_words = relevance == "words" and len(words)   # the empty caption falls back to its CLS
        expected.append(att[i, words].mean(0) if use_words else att[i, 0])
    torch.testing.assert_close(seen["rel"].double(), torch.stack(expected), rtol=1e-5, atol=1e-7)
    assert seen["num_masked"] == 6 and seen["guided_ratio"] == 0.75


# ------------------------------------------------- text-guided masking as the masking provider of MGSC and MLTC
def cls_relevance(model, b, frames=1):
    """The caption CLS's last-layer attention over patch positions, heads averaged, frame CLS columns dropped and
    frames averaged (float64), from a FusionEncoder holding the momentum weights."""
    _, fused_m = momentum_reference(model, b)
    att = fused_m.text_to_image_attentions[-1].double().mean(1)[:, 0, frames:]   # (B, F N)
    return att.unflatten(-1, (frames, att.shape[-1] // frames)).mean(1)


@pytest.mark.parametrize("frames", [1, 2])
def test_mgsc_and_mltc_text_guided_masks_come_from_the_momentum_relevance(tokenizer, monkeypatch, frames):
    """`image_masking: text_guided`: pass A drops exactly as many patches as random dropping (80% of 16 -> keeps 3),
    pass C masks int(0.3 x 16) = 4 positions; both are text_guided_mask draws over the momentum model's caption-CLS
    -> patch relevance (one momentum fusion per step, shared), and pass A keeps exactly the patches not drawn."""
    import models.objectives.glscl as glscl_module
    from models.objectives.glscl import GlsclPasses, MgscConfig, MltcConfig
    from models.passes import StepContext

    guided = dict(image_masking="text_guided", momentum=0.9, text_guided_ratio=0.75)
    model = build(tokenizer, {"mgsc": MgscConfig(**guided), "mltc": MltcConfig(**guided)}, mask_token=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in itertools.chain(model.parameters(), model.momentum.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls = []

    def spy(rel, num_masked, guided_ratio, generator=None):
        out = text_guided_mask(rel, num_masked, guided_ratio, generator)
        calls.append(dict(rel=rel, num_masked=num_masked, guided_ratio=guided_ratio, mask=out))
        return out

    monkeypatch.setattr(glscl_module, "text_guided_mask", spy)
    b = make_batch(tokenizer, frames=frames)
    ctx = StepContext(model, b)
    keep = ctx.get(GlsclPasses).keep
    model.objectives["mltc"](ctx)
    assert [c["num_masked"] for c in calls] == [16 - 3, 4] and all(c["guided_ratio"] == 0.75 for c in calls)
    expected = cls_relevance(model, b, frames)
    for c in calls:
        torch.testing.assert_close(c["rel"].double(), expected, rtol=1e-5, atol=1e-7)
    kept = [(~m).nonzero()[:, 0] for m in calls[0]["mask"]]
    assert torch.equal(keep, torch.stack(kept))
    assert torch.equal(model.objectives["mltc"].last_token_mask, calls[1]["mask"])
    assert sum(1 for k in ctx.values if k == "momentum_fusion") == 1


def test_text_guided_masking_shares_one_momentum_with_semmim(tokenizer):
    from models.objectives.glscl import MgscConfig

    cfg = MgscConfig(image_masking="text_guided", momentum=0.9)
    model = build(tokenizer, {"mgsc": cfg, "semmim": small(momentum=0.9)})
    assert "momentum_fusion" in model.passes and model.passes["momentum_fusion"].settings["relevance"] == "cls"
    with pytest.raises(ValueError, match="disagree on relevance"):
        build(tokenizer, {"mgsc": cfg, "semmim": small(momentum=0.9, relevance="words")})
    with pytest.raises(ValueError, match="disagree on coefficient"):
        build(tokenizer, {"mgsc": cfg, "semmim": small(momentum=0.995)})


# ------------------------------------------------------------------------------------------ 3: text-guided masks
def test_text_guided_mask_exact_count_in_every_case():
    g = torch.Generator().manual_seed(0)
    n = 12
    cases = {"random": torch.rand(5, n, generator=g), "zeros": torch.zeros(5, n), "ties": torch.ones(5, n),
             "sparse": torch.tensor([[0.0] * (n - 2) + [1.0, 1.0]] * 5),   # fewer positive patches than guided draws
             "negative_nan": torch.tensor([[-1.0, float("nan")] + [0.5] * (n - 2)] * 5)}
    for name, rel in cases.items():
        for ratio in (0.0, 0.3, 0.5, 1.0):
            for count in (0, 1, 5, n - 1, n):
                m = text_guided_mask(rel, count, ratio, generator=g)
                assert m.dtype == torch.bool and m.shape == rel.shape
                assert (m.sum(1) == count).all(), (name, ratio, count)
    # zero relevance ranks after any positive one: 2 guided draws of 4 always take the 2 positive patches
    m = text_guided_mask(cases["sparse"], 4, 0.5, generator=g)
    assert m[:, -2:].all()


def inclusion_probabilities(r, guided):
    """P(patch i masked) for 2 masked patches of 4: `guided` (0, 1 or 2) drawn one by one with probability ∝ r among
    the patches not yet drawn, the rest uniformly among those left; enumerated over every ordered pair."""
    p = torch.zeros(len(r), dtype=torch.float64)
    for i, j in itertools.permutations(range(len(r)), 2):
        left = [k for k in range(len(r)) if k != i]
        pi = r[i] / r.sum() if guided >= 1 else 1 / len(r)
        pj = r[j] / r[left].sum() if guided == 2 else 1 / len(left)
        p[i] += pi * pj
        p[j] += pi * pj
    return p


@pytest.mark.parametrize("ratio, guided", [(1.0, 2), (0.5, 1), (0.0, 0)])
def test_text_guided_mask_follows_relevance(ratio, guided):
    r = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    draws = 40000
    m = text_guided_mask(r.float().expand(draws, -1), 2, ratio, generator=torch.Generator().manual_seed(0))
    freq = m.double().mean(0)
    expected = inclusion_probabilities(r, guided)
    # 4.5 standard errors of a frequency over 40000 draws: deterministic with the seed, and far from a wrong law
    assert (freq - expected).abs().max() < 4.5 * math.sqrt(0.25 / draws), (freq, expected)
    if guided:
        assert freq[3] > freq[0] + 0.1   # high relevance masked more often


def test_text_guided_mask_with_ratio_zero_ignores_relevance():
    rel = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))
    a = text_guided_mask(rel, 6, 0.0, generator=torch.Generator().manual_seed(2))
    b = text_guided_mask(torch.zeros(64, 16), 6, 0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ 4: no gradient into targets
def test_targets_carry_no_gradient(tokenizer):
    # Momentum copies equal to the online weights (a fresh build): a teacher computed with the online modules and
    # gradient would give the same loss value, so only the gradients tell them apart.
    model = build(tokenizer, {"semmim": small()})
    obj = model.objectives["semmim"]
    b = make_batch(tokenizer)
    out = model(b)
    (out["losses"]["semmim_agree"] + out["losses"]["semmim_mim"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.momentum.parameters())
    assert not any(n.startswith("objectives.semmim.centers") for n, _ in model.named_parameters())
    online = {n: p for n, p in model.named_parameters() if n.startswith("objectives.semmim.")}
    online["vision.mask_token"] = model.vision.mask_token
    for n, p in online.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    got = {n: p.grad.clone() for n, p in online.items()}

    model.zero_grad()
    image_m, fused_m = momentum_reference(model, b)
    mask = obj.last_mask
    head_m = model.momentum.copy_of("objectives.semmim.head")
    with torch.no_grad():
        t_global, t_patch = ref_head(head_m, image_m[:, 0]), ref_head(head_m, fused_m.image[:, 1:])
    image, fused = student_features(model, b, mask)
    zero = torch.zeros(K)   # the centers the step used (a fresh build's; the step has moved them since)
    ref = (ref_ce(ref_head(obj.head, image[:, 0]), t_global, zero, 0.04, 0.1)
           + ref_ce(ref_head(obj.head, fused[:, 1:][mask]), t_patch[mask], zero, 0.04, 0.1))
    ref.backward()
    for n, p in online.items():
        scale = float(got[n].abs().max())   # float32 against float64: compare on the gradient's own scale
        torch.testing.assert_close(got[n], p.grad.to(got[n].dtype), rtol=1e-4, atol=2e-5 * scale, msg=n)


# ------------------------------------------------------------------------------ 5: in a model, with the others
@pytest.mark.parametrize("kw", [{}, {"predictor": "mlp", "global_feature": "fusion", "relevance": "words"}])
def test_with_itc_itm_mlm_every_semmim_parameter_gets_a_gradient(tokenizer, kw):
    model = build(tokenizer, {**all_objectives(), "semmim": small(**kw)})
    out = model(make_batch(tokenizer))
    assert torch.isfinite(out["loss"]) and {"semmim_agree", "semmim_mim"} <= set(out["losses"])
    assert all(torch.isfinite(v) for v in out["stats"].values())
    out["loss"].backward()
    mine = [(n, p) for n, p in model.named_parameters() if n.startswith("objectives.semmim.")]
    assert any(n.startswith("objectives.semmim.predictor") for n, _ in mine) == ("predictor" in kw)
    missing = [n for n, p in mine + [("vision.mask_token", model.vision.mask_token)]
               if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_composes_with_mgsc_mltc_and_ita(tokenizer):
    objectives = {**glscl_objectives(), "ita": ItaConfig(queue_size=8), "semmim": small()}
    objectives.pop("itc")   # ITA and ITC both publish the contrastive scores
    model = build(tokenizer, objectives)
    out = model(make_batch(tokenizer))
    assert {"mgsc", "mltc_image", "ita", "semmim_agree", "semmim_mim"} <= set(out["losses"])
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and n != "vision.temporal_embed" and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_bf16_keeps_float32_centers_and_finite_losses(tokenizer):
    model = build(tokenizer, {**all_objectives(), "semmim": small()}).to(torch.bfloat16)
    centers = model.objectives["semmim"].centers
    assert centers.global_.dtype == centers.patch.dtype == torch.float32
    out = model(make_batch(tokenizer))
    assert all(torch.isfinite(v.float()) for v in out["losses"].values())
    out["loss"].backward()
    assert centers.global_.dtype == torch.float32 and centers.global_.abs().sum() > 0   # moved in float32


@pytest.mark.parametrize("centering", ["mean", "sinkhorn"])
def test_video_tube_masking_and_losses_equal_float64_reference(tokenizer, centering):
    """Video (2 frames): one mask of patch positions per clip, drawn from the frame-averaged relevance, applied to
    every frame (tube); the global feature is the mean of the frame CLS tokens; every frame's masked patches are rows
    of the MIM loss, and the patch center moves with the mean over all frames and patches."""
    f, n = 2, 16
    model = perturb(build(tokenizer, {"semmim": small(centering=centering)}))
    obj = model.objectives["semmim"]
    c_global, c_patch = obj.centers.global_.clone(), obj.centers.patch.clone()
    b = make_batch(tokenizer, frames=f)
    out = model(b)
    mask = obj.last_mask
    assert mask.shape == (4, n) and (mask.sum(1) == round(0.4 * n)).all()
    image_m, fused_m = momentum_reference(model, b)
    head_m = model.momentum.copy_of("objectives.semmim.head")
    tubes = mask[:, None, :].repeat(1, f, 1)   # (B, F, N)
    with torch.no_grad():
        t_global = ref_head(head_m, image_m[:, :f].mean(1))
        t_patch = ref_head(head_m, fused_m.image[:, f:]).reshape(4, f, n, K)
        image, fused = student_features(model, b, mask)
        s_global = ref_head(obj.head, image[:, :f].mean(1))
        s_patch = ref_head(obj.head, fused[:, f:]).reshape(4, f, n, K)
    if centering == "mean":
        agree = ref_ce(s_global, t_global, c_global, 0.04, 0.1)
        mim = ref_ce(s_patch[tubes], t_patch[tubes], c_patch, 0.04, 0.1)
    else:
        ls = lambda x: torch.log_softmax(x / 0.1, -1)
        agree = -(ref_sinkhorn(t_global, 0.04, 3) * ls(s_global)).sum(-1).mean()
        mim = -(ref_sinkhorn(t_patch[tubes], 0.04, 3) * ls(s_patch[tubes])).sum(-1).mean()
    torch.testing.assert_close(out["losses"]["semmim_agree"].double(), agree, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out["losses"]["semmim_mim"].double(), mim, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(obj.centers.patch.double(), 0.9 * c_patch.double() + 0.1 * t_patch.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- 6: config errors
@pytest.mark.parametrize("key, value", [("mask_ratio", 1.0), ("mask_ratio", 0.0), ("text_guided_ratio", 1.5),
                                        ("teacher_temp", 0.0), ("num_prototypes", 0), ("center_momentum", 1.0),
                                        ("relevance", "patch"), ("predictor", "linear"), ("agree_weight", -1.0),
                                        ("teacher_temp_warmup_steps", 5), ("centering", "swav"),
                                        ("sinkhorn_iters", 0)])
def test_bad_config_is_one_line_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^objectives\.semmim\.{key}[^\n]*$"):
        SemmimConfig(**{key: value}).validate()


def test_mask_token_off_is_refused_naming_the_key(tokenizer):
    with pytest.raises(ValueError, match=r"^objectives\.semmim: [^\n]*model\.vision\.mask_token[^\n]*$"):
        build(tokenizer, {"semmim": small()}, mask_token=False)
    run = SimpleNamespace(model=SimpleNamespace(vision=SimpleNamespace(mask_token=False)),
                          data=SimpleNamespace(train=[]))
    with pytest.raises(ValueError, match=r"^objectives\.semmim: [^\n]*model\.vision\.mask_token[^\n]*$"):
        SemMIM.check_run(small(), run)
    run.model.vision.mask_token = True
    run.data.train = [SimpleNamespace(modality="video")]
    SemMIM.check_run(small(), run)   # video is accepted (tube masking)


def test_single_stream_family_and_disagreeing_momentum_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"objectives\.semmim: works with model\.family coattention"):
        check_families({"semmim": small()}, "single_stream")
    with pytest.raises(ValueError, match="disagree on coefficient"):
        build(tokenizer, {"ita": ItaConfig(queue_size=8), "semmim": small(momentum=0.99)})
