"""ITA (ALBEF/SIMLA image-text alignment with momentum distillation) against a computation written here: the online
and momentum embeddings come from two plain backbones (no StepContext, no momentum pass), the loss from explicit
float64 sums."""
import math

import pytest
import torch

from conftest import make_batch, tiny_config
from models.objectives.ita import ItaConfig
from models.objectives.itm import ItmConfig
from models.vlp import VLPBackbone, build_model

B, QUEUE = 4, 8


def _model(tokenizer, queue_size=QUEUE, **ita):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.itc.min_temperature = 0.001
    return build_model(cfg, {"ita": ItaConfig(queue_size=queue_size, **ita)}, tokenizer)


def _perturb_momentum(model, seed=1):
    """Make the momentum copies differ from the online weights (after k EMA steps they would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _momentum_backbone(model) -> VLPBackbone:
    """A plain backbone holding the momentum copies' weights (independent of the momentum pass's code)."""
    ref = VLPBackbone(model.cfg, heads=["itc"])
    sd = {}
    for name in ("vision", "text", "fusion.image_in", "fusion.text_in", "itc"):
        for k, v in model.momentum.copy_of(name).state_dict().items():
            sd[f"{name}.{k}"] = v
    missing, _ = ref.load_state_dict(sd, strict=False)
    assert all(k.startswith("fusion.") for k in missing)   # the fusion layers are not part of the momentum encoders
    return ref.eval()


def _expected(v, t, vm, tm, q_img, q_txt, tau, alpha):
    """L = (CE(s_i2t, y_i2t) + CE(s_t2i, y_t2i)) / 2 with y = alpha softmax(s_m) + (1 - alpha) onehot, in float64."""
    v, t, vm, tm, tau = (x.double() for x in (v, t, vm, tm, tau))
    cols_t = torch.cat([tm, q_txt.double()]) if q_txt is not None else tm
    cols_v = torch.cat([vm, q_img.double()]) if q_img is not None else vm
    total = 0.0
    for rows, rows_m, cols in ((v, vm, cols_t), (t, tm, cols_v)):
        for i in range(rows.shape[0]):
            s = torch.stack([rows[i] @ c for c in cols]) / tau
            s_m = torch.stack([rows_m[i] @ c for c in cols]) / tau
            p_m = torch.exp(s_m) / torch.exp(s_m).sum()
            target = alpha * p_m
            target[i] += 1 - alpha
            log_p = s - torch.log(torch.exp(s).sum())
            total = total - (target * log_p).sum() / rows.shape[0]
    return total / 2


@pytest.mark.parametrize("queued", [True, False])
@pytest.mark.parametrize("step,alpha", [(0, 0.0), (5, 0.2), (None, 0.4), (50, 0.4)])
def test_ita_equals_independent_computation(tokenizer, queued, step, alpha):
    model = _model(tokenizer, queue_size=QUEUE if queued else 0, alpha=0.4, alpha_warmup_steps=10).eval()
    _perturb_momentum(model)
    b = make_batch(tokenizer, b=B)
    if queued:   # known queue contents
        g = torch.Generator().manual_seed(3)
        for q in (model.objectives["ita"].image_queue, model.objectives["ita"].text_queue):
            q.features.copy_(torch.nn.functional.normalize(torch.randn(QUEUE, 32, generator=g), dim=-1))
        q_img = model.objectives["ita"].image_queue.features.clone()
        q_txt = model.objectives["ita"].text_queue.features.clone()
    else:
        q_img = q_txt = None
    mom = _momentum_backbone(model)
    with torch.no_grad():
        v, t = model.embed_image(b["pixel_values"]), model.embed_text(b["input_ids"], b["attention_mask"])
        vm, tm = mom.embed_image(b["pixel_values"]), mom.embed_text(b["input_ids"], b["attention_mask"])
        tau = model.itc()[2]
    assert not torch.allclose(v, vm)   # the momentum side really differs
    out = model({**b, "step": step})
    expected = _expected(v, t, vm, tm, q_img, q_txt, tau, alpha)
    assert out["stats"]["ita_alpha"].item() == pytest.approx(alpha)
    torch.testing.assert_close(out["losses"]["ita"].double(), expected, rtol=1e-5, atol=1e-6)
    if queued:   # the momentum features were enqueued after the loss: rows 0..B-1, ptr advanced
        ita = model.objectives["ita"]
        torch.testing.assert_close(ita.image_queue.features[:B], vm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ita.text_queue.features[:B], tm, rtol=1e-5, atol=1e-6)
        assert torch.equal(ita.image_queue.features[B:], q_img[B:]) and int(ita.image_queue.ptr) == B


def test_ita_gradient_reaches_online_weights_only(tokenizer):
    model = _model(tokenizer)
    model(make_batch(tokenizer, b=B))["loss"].backward()
    assert model.itc.log_inv_temperature.grad is not None and model.vision.pos_embed.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.momentum.parameters())
    assert not any(n.startswith("momentum.") for n, p in model.named_parameters() if p.requires_grad)


def test_ita_temperature_stays_in_range(tokenizer):
    model = _model(tokenizer)
    b = make_batch(tokenizer, b=B)
    for log_inv, want in ((math.log(1 / 1e-6), 0.001), (-5.0, 0.5)):
        with torch.no_grad():
            model.itc.log_inv_temperature.fill_(log_inv)
        tau = model(b)["stats"]["ita_temperature"].item()
        assert tau == pytest.approx(want)


class RankOneOfTwo:
    """Rank 1 of 2 where rank 0 holds `other`: what a real all-gather returns on rank 1 (rank order)."""
    rank, world_size = 1, 2

    def __init__(self, other):
        self.other = other

    def __call__(self, t):
        return torch.cat([self.other, t])


def test_ita_enqueues_gathered_features_in_rank_order(tokenizer):
    model = _model(tokenizer, queue_size=4 * B).eval()
    b = make_batch(tokenizer, b=B)
    rank0 = torch.nn.functional.normalize(torch.randn(B, 32), dim=-1)
    model.set_gather(RankOneOfTwo(rank0))
    with torch.no_grad():
        vm = _momentum_backbone(model).embed_image(b["pixel_values"])
    model(b)
    q = model.objectives["ita"].image_queue
    torch.testing.assert_close(q.features[:B], rank0)
    torch.testing.assert_close(q.features[B:2 * B], vm, rtol=1e-5, atol=1e-6)
    assert int(q.ptr) == 2 * B
    model(b)   # the next enqueue wraps around a queue of 2 x 2B rows: back at the start
    assert int(q.ptr) == 0 and torch.equal(q.features[:B], rank0)


def test_itm_draws_hard_negatives_from_ita_scores(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(), {"ita": ItaConfig(queue_size=QUEUE), "itm": ItmConfig()}, tokenizer).eval()
    b = make_batch(tokenizer, b=B)
    seen = []
    from models.objectives import itm as itm_module
    real = itm_module.sample_negatives
    itm_module.sample_negatives = lambda sim, forbidden: (seen.append(sim), real(sim, forbidden))[1]
    try:
        model(b)
    finally:
        itm_module.sample_negatives = real
    mom = _momentum_backbone(model)
    with torch.no_grad():
        v, tm = model.embed_image(b["pixel_values"]), mom.embed_text(b["input_ids"], b["attention_mask"])
        tau = model.itc()[2]
    torch.testing.assert_close(seen[0], v @ tm.T / tau, rtol=1e-5, atol=1e-5)   # online image vs momentum text


def test_ita_config_is_checked():
    with pytest.raises(ValueError, match="objectives.ita.momentum"):
        ItaConfig(momentum=1.0).validate()
    with pytest.raises(ValueError, match="objectives.ita.alpha "):
        ItaConfig(alpha=1.5).validate()
