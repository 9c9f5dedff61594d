"""AdamW with parameter groups, and the LR schedules (warmup + linear/cosine decay, or ALBEF/SIMLA's staircase).

A torch optimizer (not DeepSpeed's "optimizer" JSON block) avoids the JIT build of fused_adam/cpu_adam; the
ds_config must then allow it under ZeRO (`zero_allow_untested_optimizer`, set by the engine). The LambdaLR is
handed to deepspeed.initialize, which steps it at accumulation boundaries and saves it in checkpoints.
"""
from __future__ import annotations

import math

import torch

from train.config import ConfigError, TrainConfig


def official_no_decay(model: torch.nn.Module) -> set[str]:
    """The released SCL code's exclusions (train.weight_decay_exclusions: official), by what its names match: every
    bias, and the LayerNorms its modules name `LayerNorm` (RoBERTa, the fusion layers, the MLM head). CLIP's ln_*
    LayerNorms, the ITC projections' LayerNorms, position/class/temporal/token-type embeddings, the temperature and
    the mask token are decayed."""
    names = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) and not mod_name.startswith(("vision.", "itc.")):
            names.update(f"{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False))
    return names


_TOWERS = (("vision.", "vision.blocks.", ("vision.patch_embed.", "vision.pos_embed", "vision.cls_token",
                                            "vision.temporal_embed")),
           ("text.", "text.layers.", ("text.embeddings.",)))


def layer_decay_factor(name: str, depths: dict[str, int], decay: float) -> float:
    """train.layer_decay's factor for parameter `name`: tower layer i of n -> decay ** (n - i), the tower's
    embeddings -> decay ** (n + 1), anything else (final norms, fusion, heads) -> 1."""
    for tower, layers, embeddings in _TOWERS:
        n = depths.get(tower)
        if n is None or not name.startswith(tower):
            continue
        if name.startswith(layers):
            return decay ** (n - int(name[len(layers):].split(".")[0]))
        if name.startswith(embeddings):
            return decay ** (n + 1)
    return 1.0


def _tower_depths(model: torch.nn.Module) -> dict[str, int]:
    stacks = model.layer_stacks() if hasattr(model, "layer_stacks") else {}
    return {f"{t}.": len(stacks[t]) for t in ("vision", "text") if t in stacks}


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Group trainable params by (weight decay on/off, lr multiplier); the longest matching name prefix wins, times
    the layer-wise decay factor when train.layer_decay is set."""
    official = cfg.weight_decay_exclusions == "official"
    if official:
        no_wd = official_no_decay(model)
    else:
        no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    prefixes = sorted(cfg.lr_multipliers, key=len, reverse=True)
    used = set()
    depths = _tower_depths(model) if cfg.layer_decay is not None else {}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0
        for pre in prefixes:
            if name.startswith(pre):
                mult = cfg.lr_multipliers[pre]
                used.add(pre)
                break
        if cfg.layer_decay is not None:
            mult *= layer_decay_factor(name, depths, cfg.layer_decay)
        decay = name not in no_wd if official else (p.ndim >= 2 and name not in no_wd)
        key = (decay, mult)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                           "lr": cfg.lr * mult, "lr_mult": mult, "decay": decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    unused = [p for p in cfg.lr_multipliers if p not in used]
    if unused:
        raise ConfigError(f"train.lr_multipliers.{unused[0]}: prefix matches no trainable parameter")
    # Group order is fixed (sorted key) so optimizer state lines up across runs and ranks.
    out = [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]
    for g in out:
        del g["names"]   # torch optimizers keep unknown keys; names would bloat every checkpoint
    return out


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose updates the engine can veto for one optimizer step (`skip_next`), for steps whose loss or
    gradients were non-finite. DeepSpeed's ZeRO wrappers call step() once per parameter group, so the decision
    is taken by the engine once per step (agreed across ranks) and every call obeys it: all or nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_next = False

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return SkippableAdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig) -> None:
    """Put the run config's lr / weight decay / betas / eps into an optimizer and LambdaLR that were restored from
    a checkpoint (their saved values would otherwise silently win over a changed config)."""
    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.lr * g["lr_mult"]
        g["weight_decay"] = cfg.weight_decay if g["decay"] else 0.0
        g["betas"], g["eps"] = tuple(cfg.betas), cfg.eps
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    factor = lr_factor(scheduler.last_epoch, cfg)
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier (of each group's peak lr) for optimizer step `step` (0-based): linear warmup, then linear/cosine
    decay to min_lr_ratio over the rest of max_steps; train.schedule staircase -> staircase_factor.

    Warmup length W = train.warmup_steps if set, else round(warmup_ratio * max_steps). With warmup_start_ratio
    r = 0 the warmup is (step + 1) / W, as it always was (step 0 already trains at 1/W, step W-1 at the peak). With
    r > 0 it is r + (1 - r) * step / W: step 0 trains at r (SIMLA's warmup_lr) and the line reaches 1 at step W,
    the first step of the decay."""
    if cfg.schedule == "staircase":
        return staircase_factor(step, cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * cfg.max_steps))
    if step < warmup:
        r = cfg.warmup_start_ratio
        return (step + 1) / warmup if r == 0 else r + (1.0 - r) * step / warmup
    decay_steps = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def staircase_factor(step: int, cfg: TrainConfig) -> float:
    """The released ALBEF/SIMLA schedule (Pretrain.py + timm CosineLRScheduler with warmup_prefix=True,
    t_initial=epochs, warmup_t=warmup_epochs, cycle_limit=1), as the factor in effect at optimizer step `step`.

    S = step_size, W = warmup_epochs, E = epochs, r = warmup_start_ratio (warmup_lr / lr), m = min_lr_ratio,
    e = step // steps_per_epoch.
    - Epoch 0: the loop calls sched.step(i // S) after the optimizer step of iteration i = 0, S, 2S, ... <= W*S, so
      step k trains at stair t = 0 for k = 0 (the scheduler's initial warmup_lr) and t = min((k - 1) // S, W) for
      k >= 1: factor r + t * (1 - r) / W while t < W, then 1 for the rest of epoch 0 (the cosine at t' = 0).
      Stair t thus covers steps t*S+1 .. (t+1)*S: one step later than "t = k // S" reads; the peak is first used
      at step W*S + 1 (SIMLA: step 2001).
    - Epoch e >= 1 (sched.step(e + W) at its start, t' = e): m + 0.5 * (1 - m) * (1 + cos(pi * e / E)) for the
      whole epoch; from e >= E on timm is past its one cycle and returns lr_min: factor m.
    Where it differs from timm: timm's warmup_lr and lr_min are absolute lrs shared by every parameter group; here
    they are fractions of each group's own lr, so the two agree exactly when every group has lr_mult 1 (SIMLA).
    A warmup longer than epoch 0 is cut off by epoch 1's cosine, as in the official loop."""
    sc = cfg.staircase
    r, m, W = cfg.warmup_start_ratio, cfg.min_lr_ratio, sc.warmup_epochs
    epoch = step // sc.steps_per_epoch
    if epoch == 0:
        t = 0 if step == 0 else min((step - 1) // sc.step_size, W)
        return r + t * (1.0 - r) / W if t < W else 1.0
    if epoch >= sc.epochs:
        return m
    return m + 0.5 * (1.0 - m) * (1.0 + math.cos(math.pi * epoch / sc.epochs))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
