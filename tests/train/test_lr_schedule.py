"""LR schedule: train.warmup_steps / warmup_start_ratio, and the ALBEF/SIMLA staircase checked step by step against
the official loop driving timm's real CosineLRScheduler."""
import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from train.config import ConfigError, StaircaseConfig, TrainConfig, load_config
from train.optim import build_scheduler, lr_factor

from conftest import TINY

LR = 1e-4


def _optimizer(lr=LR):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def official_lrs(steps_per_epoch, epochs, step_size, warmup_epochs, warmup_lr, min_lr, max_epoch):
    """The LR each optimizer step trains at in SIMLA's Pretrain.py: sched.step(epoch + warmup_epochs) at the start of
    every epoch > 0, and in epoch 0 sched.step(i // step_size) after the optimizer step of iteration i."""
    opt = _optimizer()
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup_epochs,
                              cycle_limit=1, t_in_epochs=True, warmup_prefix=True)
    warmup_iters = warmup_epochs * step_size
    out = []
    for epoch in range(max_epoch):
        if epoch > 0:
            sched.step(epoch + warmup_epochs)
        for i in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])   # what optimizer.step() of this iteration uses
            if epoch == 0 and i % step_size == 0 and i <= warmup_iters:
                sched.step(i // step_size)
    return out


def _staircase_cfg(spe=350, epochs=4, step_size=10, warmup_epochs=20, r=0.1, m=0.1):
    return TrainConfig(lr=LR, max_steps=10 ** 6, schedule="staircase", warmup_start_ratio=r, min_lr_ratio=m,
                       staircase=StaircaseConfig(steps_per_epoch=spe, epochs=epochs, step_size=step_size,
                                                 warmup_epochs=warmup_epochs))


@pytest.mark.parametrize("spe, epochs, step_size, warmup_epochs", [
    (350, 4, 10, 20),   # warmup (201 steps) inside epoch 0, then a hold, 3 cosine epochs, then past the cycle
    (150, 3, 10, 20),   # warmup longer than epoch 0: cut off by epoch 1
    (50, 3, 7, 0),      # no warmup
])
def test_staircase_matches_the_official_loop_with_timm(spe, epochs, step_size, warmup_epochs):
    max_epoch = epochs + 2   # two epochs past timm's single cycle (lr_min there)
    want = official_lrs(spe, epochs, step_size, warmup_epochs, warmup_lr=0.1 * LR, min_lr=0.1 * LR,
                        max_epoch=max_epoch)
    cfg = _staircase_cfg(spe, epochs, step_size, warmup_epochs)
    got = [LR * lr_factor(s, cfg) for s in range(len(want))]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    if warmup_epochs and spe > warmup_epochs * step_size + 1:
        peak = warmup_epochs * step_size + 1   # first step at the peak, one after the last warmup sched.step
        assert got[peak - 1] < LR and got[peak] == pytest.approx(LR)


def test_staircase_reaches_the_optimizer_through_build_scheduler():
    cfg = _staircase_cfg()
    want = official_lrs(350, 4, 10, 20, warmup_lr=0.1 * LR, min_lr=0.1 * LR, max_epoch=5)
    opt = _optimizer()
    sched = build_scheduler(opt, cfg)
    got = []
    for _ in want:
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_warmup_steps_and_start_ratio_follow_the_hand_formula():
    cfg = TrainConfig(max_steps=100, warmup_ratio=0.5, warmup_steps=20, warmup_start_ratio=0.1, schedule="cosine",
                      min_lr_ratio=0.2)
    for s in range(100):
        if s < 20:   # r + (1 - r) * s / W: step 0 at r, reaching 1 at step W
            want = 0.1 + 0.9 * s / 20
        else:        # the cosine over the remaining 80 steps, unchanged
            want = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 20) / 80))
        assert lr_factor(s, cfg) == pytest.approx(want, rel=1e-12), s
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(20, cfg) == pytest.approx(1.0)
    # warmup_steps overrides warmup_ratio also without a start ratio: (s + 1) / W
    plain = TrainConfig(max_steps=100, warmup_ratio=0.5, warmup_steps=20)
    assert [lr_factor(s, plain) for s in (0, 19, 20)] == pytest.approx([1 / 20, 1.0, 1.0])


def _previous_lr_factor(step, cfg):
    """lr_factor as it was before warmup_steps / warmup_start_ratio / staircase (copied), for exact comparison."""
    warmup = int(round(cfg.warmup_ratio * cfg.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("max_steps, warmup_ratio, min_lr_ratio", [(100, 0.1, 0.1), (37, 0.05, 0.0), (4, 0.25, 0.0),
                                                                    (10, 0.0, 0.3)])
def test_zero_start_ratio_reproduces_the_previous_factors_exactly(schedule, max_steps, warmup_ratio, min_lr_ratio):
    cfg = TrainConfig(max_steps=max_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, schedule=schedule)
    assert cfg.warmup_steps is None and cfg.warmup_start_ratio == 0.0
    for s in range(max_steps + 3):
        assert lr_factor(s, cfg) == _previous_lr_factor(s, cfg)   # bit-identical: resumed runs continue the same


def test_warmup_lr_reaches_the_optimizer_through_build_scheduler():
    cfg = TrainConfig(lr=LR, max_steps=30, warmup_steps=10, warmup_start_ratio=0.1, schedule="linear")
    opt = _optimizer()
    sched = build_scheduler(opt, cfg)
    for s in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(LR * lr_factor(s, cfg), rel=1e-12)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0   # max_steps still ends the linear decay


@pytest.mark.parametrize("overrides, message", [
    (["train.schedule=staircase"],
     "train.staircase.steps_per_epoch: is required when train.schedule is staircase"),
    (["train.schedule=staircase", "train.staircase.steps_per_epoch=0"], "train.staircase.steps_per_epoch: must be > 0"),
    (["train.schedule=staircase", "train.staircase={steps_per_epoch: 10, epochs: 0}"], "train.staircase.epochs: must"),
    (["train.staircase.step_size=0"], "train.staircase.step_size: must be > 0"),
    (["train.staircase.warmup_epochs=-1"], "train.staircase.warmup_epochs: must be >= 0"),
    (["train.staircase.bogus=1"], "train.staircase.bogus: unknown key"),
    (["train.schedule=staircase", "train.staircase.steps_per_epoch=10", "train.warmup_steps=5"],
     "train.warmup_steps: not used by schedule staircase"),
    (["train.warmup_steps=-1"], "train.warmup_steps: must be null or >= 0"),
    (["train.warmup_start_ratio=1.5"], "train.warmup_start_ratio: must be in [0, 1]"),
])
def test_bad_schedule_configs_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_simla_staircase_config_loads():
    cfg = load_config(TINY, ["train.schedule=staircase", "train.staircase.steps_per_epoch=5000",
                             "train.warmup_start_ratio=0.1", "train.min_lr_ratio=0.1"]).train
    assert (cfg.staircase.epochs, cfg.staircase.step_size, cfg.staircase.warmup_epochs) == (30, 100, 20)
    f = [lr_factor(s, cfg) for s in (0, 100, 101, 2000, 2001, 4999, 5000, 29 * 5000)]
    assert f[:6] == pytest.approx([0.1, 0.1, 0.1 + 0.9 / 20, 1.0 - 0.9 / 20, 1.0, 1.0])
    assert f[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 30)))
    assert LR * f[7] == pytest.approx(1.02e-5, rel=1e-2)   # methods.md: "about 1.02e-5" at epoch 29 (1.0247e-5)
