"""Shared pieces of tests/train/test_momentum.py, and its 2-rank entry point (not collected by pytest):

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/train/momentum_entry.py 3 fp32

A few Linear layers with a MomentumCopies of some of them, under deepspeed.initialize with a torch AdamW (no
Engine). `train_with_ema` runs k optimizer steps, calls the EmaUpdate after each and records the full (gathered)
online weights; `formula` is m^k q0 + sum_i (1-m) m^(k-i) p_i in float64 from those records. The entry point
checks the formula on every rank, that the ranks agree, and a resume of the EMA state into a fresh model. It is
the test that sees stale persistent ZeRO-3 parameters: with one rank DeepSpeed's gathered data aliases the
partition, so a missing re-gather after writing partitions goes unnoticed there.
"""
import io
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.momentum import FeatureQueue, MomentumCopies  # noqa: E402

COPIED = ["a", "b.0", "head"]
# ZeRO-3 keeps parameters of <= this many elements gathered between steps ("persistent"): the biases (16, 4) are,
# the weights (128, 256, 64) are not, so both kinds of ZeRO-3 momentum parameter are exercised.
PERSISTENCE = 20


class Net(nn.Module):
    def __init__(self, m: float):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
        self.head = nn.Linear(16, 4)
        self.momentum = MomentumCopies(self, COPIED, m)
        self.queue = FeatureQueue(size=8, dim=4)

    def momentum_forward(self, x):
        c = self.momentum.copy_of
        return c("head")(torch.relu(c("b.0")(torch.relu(c("a")(x)))))

    def forward(self, x, y):
        out = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        with torch.no_grad():
            out_m = self.momentum_forward(x)
        return (out.float() - y).pow(2).mean(), out_m


def init_dist():
    from train.distributed import init_distributed
    return init_distributed()


def build(stage: int, precision: str, m: float, seed: int = 0, lr: float = 1e-2):
    """(engine, ema, queues) for a fresh Net under deepspeed.initialize."""
    import deepspeed

    from train.momentum import EmaUpdate, QueueState

    init_dist()
    torch.manual_seed(seed)
    net = Net(m)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": PERSISTENCE}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg, dist_init_required=False)
    BUILT.append(engine)
    return engine, EmaUpdate(engine.module), QueueState(engine.module)


BUILT: list = []   # DeepSpeed keeps engines reachable; release_all() frees their buckets (ZeRO-3: ~2 GB each)


def release_all() -> None:
    while BUILT:
        BUILT.pop().destroy()


def pairs(engine):
    return engine.module.momentum.pairs(engine.module)


def gathered(params) -> list:
    """Full float64 copies of `params` (gathered under ZeRO-3; a no-op gather otherwise)."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().double().clone() for p in params]


def local_data(params) -> list:
    return [(p.ds_tensor if hasattr(p, "ds_id") else p.data).detach().clone() for p in params]


def batch(engine, step: int, rank: int = 0):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    return (x.bfloat16() if engine.bfloat16_enabled() else x), y


def train_with_ema(engine, ema, steps: int, rank: int = 0) -> tuple[list, list]:
    """Run `steps` optimizer steps with the EMA hook after each. Returns (q0, [online weights after step i])."""
    ps = pairs(engine)
    q0 = gathered([q for _, _, q in ps])
    online = []
    for i in range(steps):
        x, y = batch(engine, i, rank)
        loss, _ = engine(x, y)
        engine.backward(loss)
        engine.step()
        ema(engine, True)
        online.append(gathered([p for _, p, _ in ps]))
    return q0, online


def formula(q0: list, online: list, m: float) -> list:
    """m^k q0 + sum_{i=1..k} (1-m) m^(k-i) p_i, per parameter, float64."""
    k = len(online)
    out = []
    for j, q in enumerate(q0):
        acc = q * m ** k
        for i, p in enumerate(online, start=1):
            acc = acc + (1 - m) * m ** (k - i) * p[j]
        out.append(acc)
    return out


def check_formula(engine, ema, steps: int, m: float, rank: int = 0) -> None:
    """Train with the hook, then: gathered momentum weights == the formula (1e-6), the momentum forward uses
    them, and they differ from both q0 and the online weights (the check can fail)."""
    q0, online = train_with_ema(engine, ema, steps, rank)
    want = formula(q0, online, m)
    ps = pairs(engine)
    have = gathered([q for _, _, q in ps])
    for (name, _, _), h, w, a, p in zip(ps, have, want, q0, online[-1]):
        torch.testing.assert_close(h, w, rtol=0, atol=1e-6, msg=lambda s: f"{name}: {s}")
        assert (h - a).abs().max() > 1e-4 and (h - p).abs().max() > 1e-4, name
    # the momentum copies' forward (ZeRO-3: fetched by DeepSpeed's hooks) sees the averaged weights
    x, y = batch(engine, 99, rank)
    with torch.no_grad():
        _, out_m = engine(x, y)
    w = dict(zip([n for n, _, _ in ps], want))
    ref = torch.relu(x.double() @ w["a.weight"].T + w["a.bias"])
    ref = torch.relu(ref @ w["b.0.weight"].T + w["b.0.bias"])
    ref = ref @ w["head.weight"].T + w["head.bias"]
    torch.testing.assert_close(out_m.double(), ref, rtol=0, atol=1e-5)


def main(stage: int, precision: str) -> None:
    import torch.distributed as dist

    info = init_dist()
    m, steps = 0.9, 4
    engine, ema, _ = build(stage, precision, m)
    check_formula(engine, ema, steps, m, rank=info.rank)
    # both ranks hold the same momentum weights (each has its own data; DeepSpeed averages gradients)
    flat = torch.cat([t.flatten() for t in gathered([q for _, _, q in pairs(engine)])])
    peers = [torch.zeros_like(flat) for _ in range(info.world_size)]
    dist.all_gather(peers, flat)
    assert all(torch.equal(peers[0], t) for t in peers), "ranks differ"
    # resume: this rank's state through torch.save/torch.load(weights_only=True) into a fresh model that has
    # stepped once (its persistent momentum parameters are held gathered, as after DeepSpeed's load_checkpoint)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh, fresh_ema, _ = build(stage, precision, m, seed=1)
    train_with_ema(fresh, fresh_ema, 1, info.rank)
    fresh_ema.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(local_data([q for _, _, q in pairs(engine)]),
                                                  local_data([q for _, _, q in pairs(fresh)])))
    assert all(torch.equal(a, b) for a, b in zip(gathered([q for _, _, q in pairs(engine)]),
                                                  gathered([q for _, _, q in pairs(fresh)]))), "stale after load"
    x, y = batch(engine, 5, info.rank)
    with torch.no_grad():
        assert torch.equal(engine(x, y)[1], fresh(x, y)[1])
    shards = {tuple(s.shape) for s in ema.shadows}
    print(f"momentum ok rank={info.rank} world={info.world_size} shadow shapes={sorted(shards)}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
