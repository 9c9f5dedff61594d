"""EmaUpdate and QueueState on real DeepSpeed (CPU, gloo), without our Engine: the EMA formula under ZeRO 0 and 3
(1 and 2 ranks), the fp32 shadow under bf16, skipped steps, checkpoint round trips, and what DeepSpeed itself does
with frozen parameters under ZeRO-3. Helpers and the 2-rank entry point are in momentum_entry.py."""
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import momentum_entry as me   # tests/train is on sys.path (pytest's prepend import mode)
from train.checkpoint_io import safe_load  # noqa: E402
from models.momentum import MomentumCopies
from train.momentum import EmaUpdate, QueueState

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _release_engines():
    yield
    me.release_all()


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stage", [0, 3])
def test_ema_matches_the_formula_fp32(stage):
    m = 0.9
    engine, ema, _ = me.build(stage, "fp32", m)
    assert len(ema) == 6 and ema.names[0] == "momentum.copies.a.weight"
    me.check_formula(engine, ema, steps=4, m=m)


def test_two_rank_zero3_both_ranks_end_with_the_formula():
    """Two gloo ranks, ZeRO-3 fp32, different data per rank: the formula on both, equal ranks, and an exact resume
    of each rank's EMA state (see momentum_entry.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", DS_SKIP_SHM_OP="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "train" / "momentum_entry.py"), "3", "fp32"],
                              cwd=REPO_ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        line = next(x for x in out.splitlines() if x.startswith(f"momentum ok rank={r} world=2"))
        # this rank's partitions of 128/16/256/16/64/4-element tensors: halves, not whole tensors
        assert line.endswith("shadow shapes=[(2,), (8,), (32,), (64,), (128,)]"), line


def test_bf16_shadow_moves_weights_that_a_bf16_ema_would_not():
    """m = 0.995 and small steps: (1-m)(p-q) is mostly below half a bf16 ulp of q, so an EMA done in bf16 barely
    leaves q0; the fp32 shadow accumulates and the bf16 momentum weights are the fp32 formula rounded to bf16."""
    m, steps = 0.995, 30
    engine, ema, _ = me.build(2, "bf16", m, lr=3e-3)
    ps = me.pairs(engine)
    assert all(q.dtype == torch.bfloat16 for _, _, q in ps)
    q0, online = me.train_with_ema(engine, ema, steps)
    want = [w.float() for w in me.formula(q0, online, m)]
    for (name, _, _), s, w in zip(ps, ema.shadows, want):
        torch.testing.assert_close(s, w, rtol=0, atol=1e-6, msg=lambda x: f"shadow {name}: {x}")
    naive = [q.to(torch.bfloat16) for q in q0]
    for p_i in online:                        # the same EMA in bf16 arithmetic (ALBEF's in-place update)
        naive = [q * m + p.to(torch.bfloat16) * (1 - m) for q, p in zip(naive, p_i)]
    flat = lambda ts: torch.cat([t.detach().float().flatten() for t in ts])
    have, want, start, naive = flat(q for _, _, q in ps), flat(want), flat(q0), flat(naive)
    torch.testing.assert_close(have, want, rtol=2 ** -8, atol=1e-6)          # within a bf16 ulp everywhere
    assert (have == want.bfloat16().float()).float().mean() > 0.99          # and almost always its rounding
    assert (have != start).float().mean() > 0.7                             # ours moved...
    assert (naive != start).float().mean() < 0.3                            # ...where a bf16 EMA stays stuck
    assert (naive == want.bfloat16().float()).float().mean() < 0.5


def test_a_skipped_step_changes_nothing():
    engine, ema, _ = me.build(3, "fp32", 0.9)
    me.train_with_ema(engine, ema, steps=2)
    ps = me.pairs(engine)
    before_local = me.local_data([q for _, _, q in ps])
    before_full = me.gathered([q for _, _, q in ps])
    before_shadows = [s.clone() for s in ema.shadows]
    x, y = me.batch(engine, 7)
    loss, _ = engine(x, y)
    engine.backward(loss)
    engine.step()                               # the online weights move...
    ema(engine, False)                          # ...but the step is reported as skipped
    assert all(torch.equal(a, b) for a, b in zip(before_local, me.local_data([q for _, _, q in ps])))
    assert all(torch.equal(a, b) for a, b in zip(before_full, me.gathered([q for _, _, q in ps])))
    assert all(torch.equal(a, b) for a, b in zip(before_shadows, ema.shadows))


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (3, "bf16")])
def test_state_round_trip_restores_momentum_and_queues_exactly(stage, precision):
    engine, ema, queues = me.build(stage, precision, 0.9)
    me.train_with_ema(engine, ema, steps=3)
    engine.module.queue.enqueue(torch.randn(4, 4))
    engine.module.queue.enqueue(torch.randn(4, 4))
    engine.module.queue.enqueue(torch.randn(2, 4))
    ema_state, queue_state = _roundtrip(ema.state_dict()), _roundtrip(queues.state_dict())
    assert set(ema_state) == {"names", "coefficients", "shadows"} and ema_state["coefficients"] == {"momentum": 0.9}
    assert all(s.dtype == torch.float32 for s in ema_state["shadows"])
    assert list(queue_state) == ["queue"] and int(queue_state["queue"]["ptr"]) == 2

    fresh, fresh_ema, fresh_queues = me.build(stage, precision, 0.9, seed=1)
    me.train_with_ema(fresh, fresh_ema, steps=1)   # as after DeepSpeed's load: persistent parameters held gathered
    ps, fresh_ps = me.pairs(engine), me.pairs(fresh)
    assert not torch.equal(me.gathered([ps[0][2]])[0], me.gathered([fresh_ps[0][2]])[0])
    fresh_ema.load_state_dict(ema_state)
    fresh_queues.load_state_dict(queue_state)
    for a, b in zip(me.local_data([q for _, _, q in ps]), me.local_data([q for _, _, q in fresh_ps])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(me.gathered([q for _, _, q in ps]), me.gathered([q for _, _, q in fresh_ps])):
        assert torch.equal(a, b)   # ZeRO-3: the persistent (held-gathered) ones were refreshed too
    assert all(torch.equal(a, b) for a, b in zip(ema.shadows, fresh_ema.shadows))
    assert torch.equal(engine.module.queue.features, fresh.module.queue.features)
    assert fresh.module.queue.features.dtype == torch.float32
    assert torch.equal(engine.module.queue.ptr, fresh.module.queue.ptr)
    # and both go on identically
    x, y = me.batch(engine, 5)
    with torch.no_grad():
        assert torch.equal(engine(x, y)[1], fresh(x, y)[1])


def test_mismatched_states_are_one_line_value_errors():
    engine, ema, queues = me.build(0, "fp32", 0.9)
    good, qgood = ema.state_dict(), queues.state_dict()
    bad_states = [
        {**good, "names": good["names"][:-1]},
        {**good, "names": ["x"] + good["names"][1:]},
        {**good, "shadows": good["shadows"][:1] + [torch.zeros(3)] + good["shadows"][2:]},
        {**good, "shadows": good["shadows"][:-1]},
        {"names": good["names"]},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError) as e:
            ema.load_state_dict(bad)
        assert "\n" not in str(e.value)
    for bad in ({}, {"other": qgood["queue"]}, {"queue": {**qgood["queue"], "features": torch.zeros(4, 4)}},
                {"queue": {**qgood["queue"], "ptr": torch.tensor([8])}}, {"queue": {"features": torch.zeros(8, 4)}}):
        with pytest.raises(ValueError) as e:
            queues.load_state_dict(bad)
        assert "\n" not in str(e.value)
    # nothing was half-loaded
    assert all(torch.equal(a, b) for a, b in zip(good["shadows"], ema.shadows))
    assert torch.equal(qgood["queue"]["features"], engine.module.queue.features)


def test_ema_refuses_trainable_momentum_parameters():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.momentum = MomentumCopies(self, ["a"], 0.9)

    bad = Bad()
    bad.requires_grad_(True)   # e.g. a careless "unfreeze everything"
    with pytest.raises(ValueError, match="requires grad"):
        EmaUpdate(bad)
    assert len(EmaUpdate(nn.Linear(2, 2))) == 0 and QueueState(nn.Linear(2, 2)).state_dict() == {}


def test_what_zero3_does_with_frozen_parameters(tmp_path):
    """DeepSpeed 0.19 facts the design leans on: frozen parameters are partitioned, kept out of the optimizer,
    fetched for forward by the hooks (test_ema_matches_the_formula_fp32[3] checks the output) and released, and
    save_checkpoint/load_checkpoint keep their partitions."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine, ema, _ = me.build(3, "fp32", 0.9)
    frozen = [q for _, _, q in me.pairs(engine)]
    assert all(hasattr(q, "ds_id") and q.ds_tensor.numel() == q.ds_numel for q in frozen)   # one rank: whole
    optimized = {id(p) for g in engine.optimizer.fp16_groups for p in g}
    assert optimized and not any(id(q) in optimized for q in frozen)
    x, y = me.batch(engine, 0)
    loss, _ = engine(x, y)
    assert all(q.ds_status == ZeroParamStatus.NOT_AVAILABLE for q in frozen)   # released after forward
    engine.backward(loss)
    engine.step()
    # after the step DeepSpeed re-gathers the persistent (small) parameters, frozen ones included; the EMA hook
    # writes partitions and re-gathers the same set, so nothing stale stays held
    persistent = {n for n, p in engine.module.named_parameters() if p.ds_numel <= me.PERSISTENCE}
    assert any(n.startswith("momentum.") for n in persistent)
    held = lambda: {n for n, p in engine.module.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE}
    assert held() == persistent
    ema(engine, True)
    assert held() == persistent
    engine.save_checkpoint(str(tmp_path), tag="t")
    saved = safe_load(str(tmp_path / "t" / "zero_pp_rank_0_mp_rank_00_model_states.pt"))   # DeepSpeed's own file
    names = [n for n in ema.names]
    assert sorted(saved["frozen_param_fragments"]) == sorted(names)
    want = me.local_data(frozen)
    with torch.no_grad():
        for q in frozen:
            q.ds_tensor.fill_(7.0)
    engine.load_checkpoint(str(tmp_path), tag="t")
    assert all(torch.equal(a, b) for a, b in zip(want, me.local_data(frozen)))
