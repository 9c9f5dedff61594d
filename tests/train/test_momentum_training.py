"""ITA with momentum encoders and queues through the real engine: the EMA after-step hook and the checkpoint parts.
A run stopped at step 2 and resumed ends bit-identical to an uninterrupted one (losses, momentum weights, queues),
under ZeRO 0 and ZeRO 3."""
import math

import pytest
import torch

from conftest import TINY, data_overrides, read_metrics, write_ds_config

ITA = ["objectives={ita: {queue_size: 16, momentum: 0.9, alpha_warmup_steps: 2}, itm: {}, mlm: {}}",
       "model.itc.min_temperature=0.001", "train.max_steps=4", "train.save_every=0", "train.eval_every=0"]
KEYS = ("loss", "loss_ita", "loss_itm", "loss_mlm", "ita_alpha", "lr")


def _state(engine) -> dict:
    """Momentum weights (gathered under ZeRO-3), queue buffers, and the online ITC head, on CPU."""
    import deepspeed
    module = engine.module
    out = {}
    named = [(n, p) for n, p in module.named_parameters() if n.startswith(("momentum.", "itc."))]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=engine.zero_stage == 3):
        for n, p in named:
            out[n] = p.detach().float().cpu().clone()
    for n, b in module.named_buffers():
        if "queue" in n:
            out[n] = b.detach().cpu().clone()
    return out


def _run(demo_shards, out, ds, stop_at=None):
    from train import pretrain

    seen = {}

    def hook(engine):
        seen["engine"] = engine
        if stop_at is not None:
            engine.add_after_step(lambda e, applied: e.request_stop() if e.step == stop_at else None)
    cfg, ds_cfg = pretrain.prepare(["--deepspeed_config", ds, "--config", TINY, "--output_dir", str(out), *ITA,
                                    *data_overrides(demo_shards)])
    result = pretrain.run(cfg, ds_cfg, engine_hook=hook)
    return result, _state(seen["engine"])


@pytest.mark.parametrize("stage", [0, 3])
def test_ita_momentum_and_queues_resume_bit_for_bit(demo_shards, tmp_path, stage):
    ds = write_ds_config(tmp_path, stage, "fp32")
    _, full_state = _run(demo_shards, tmp_path / "full", ds)
    full = read_metrics(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert [r["ita_alpha"] for r in full] == pytest.approx([0.0, 0.2, 0.4, 0.4])   # ramp over 2 steps (alpha 0.4)
    assert all(math.isfinite(r["loss_ita"]) for r in full)

    first, cut_state = _run(demo_shards, tmp_path / "cut", ds, stop_at=2)
    assert first["stopped"] and (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_2"
    assert not torch.equal(cut_state["momentum.copies.itc.image_proj.0.weight"],
                           full_state["momentum.copies.itc.image_proj.0.weight"])   # the momentum weights moved on
    _, resumed_state = _run(demo_shards, tmp_path / "cut", ds)
    resumed = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for k in KEYS:
            assert b[k] == a[k], (k, a["step"], a[k], b[k])
    assert full_state.keys() == resumed_state.keys()
    assert any(k.endswith("queue.features") for k in full_state)
    for k in full_state:
        assert torch.equal(full_state[k], resumed_state[k]), k
