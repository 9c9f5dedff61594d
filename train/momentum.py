"""The DeepSpeed side of momentum encoders and feature queues: the EMA after-step hook and two checkpoint parts.

    ema = EmaUpdate(engine.module)              # after deepspeed.initialize; finds every MomentumCopies
    engine.register_part("momentum", ema)       # state_dict()/load_state_dict(): plain tensors and types only
    engine.register_part("queues", QueueState(engine.module))
    engine.add_after_step(ema)                  # ema(engine, applied) after each optimizer step

Why an fp32 shadow: under bf16 the module's parameters are bf16, and m*q + (1-m)*p with m = 0.995 rounded to bf16
barely moves q (the step is below half an ulp). EmaUpdate keeps the EMA in fp32 and writes its bf16 rounding into
the momentum parameters, so the shadow, not the parameters, is the state (and what a resume restores).

Local data: under ZeRO-3 a parameter's own data is its partition `p.ds_tensor` (an online parameter and its copy
have equal shapes, so equal partitions); otherwise `p.data`. The update touches only local data: no gather.

What DeepSpeed 0.19.8 does with frozen (requires_grad=False) parameters under ZeRO-3 (checked by
tests/train/test_momentum.py): they are partitioned like any other (ds_tensor on every rank), gathered for forward
by its module hooks and released after it, left out of the optimizer, and save_checkpoint/load_checkpoint keep
their partitions (`frozen_param_fragments`, stages 2 and 3). Parameters under `stage3_param_persistence_threshold`
(default 1e5 elements) stay gathered between steps; DeepSpeed refreshes them from their partitions right after
the optimizer step, i.e. before this hook runs, so after writing partitions the hook re-gathers the persistent
momentum parameters itself (a collective: every rank runs the hook, as every rank steps).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.momentum import FeatureQueue, MomentumCopies

_CHUNK = 64   # tensors per foreach call: bounds the fp32 copies of bf16 online data made at once


def _unwrap(module: nn.Module) -> nn.Module:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:   # pragma: no cover - deepspeed is a dependency of train/
        return module
    return module.module if isinstance(module, DeepSpeedEngine) else module


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's data of `p`: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if _is_zero3(p) else p.data


def _refresh_gathered(params: list) -> None:
    """Re-gather ZeRO-3 parameters that are held gathered (persistent ones) after their partitions were written,
    so the full copy the next forward uses is not stale. Collective over the parameters' group."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    held = [p for p in params if _is_zero3(p) and p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    if held:
        held[0].partition(held)    # frees the stale full data; the partition (already written) is kept
        held[0].all_gather(held)


class EmaUpdate:
    """EMA of every MomentumCopies in `module` (the DeepSpeed engine's `.module`, after deepspeed.initialize):
    shadow = m * shadow + (1 - m) * online, then momentum <- shadow (cast to the parameter dtype), on local data.

    Each MomentumCopies' source is the module that holds it (its parent in `module`). `names` are the momentum
    parameters' names in `module` (as in its state_dict), in the update order.
    """

    def __init__(self, module: nn.Module):
        module = _unwrap(module)
        param_names: dict[int, str] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            param_names.setdefault(id(p), n)
        self.names: list[str] = []
        self.coefficients: dict[str, float] = {}   # MomentumCopies path -> m
        self._groups: list[tuple[float, list, list, list]] = []   # (m, online params, momentum params, shadows)
        self._momentum: list = []
        for path, sub in module.named_modules():
            if not isinstance(sub, MomentumCopies):
                continue
            owner = module.get_submodule(path.rpartition(".")[0]) if "." in path else module
            online, moment, shadows = [], [], []
            for name, p, q in sub.pairs(owner):
                qname = param_names[id(q)]
                if q.requires_grad:
                    raise ValueError(f"EmaUpdate: momentum parameter {qname} requires grad (the optimizer would "
                                     f"train it); momentum copies must stay frozen")
                if _is_zero3(p) != _is_zero3(q):
                    raise ValueError(f"EmaUpdate: {qname} and its source {name} are not both ZeRO-3 partitioned")
                if _is_zero3(q):
                    if getattr(q.ds_tensor, "ds_quant_scale", None) is not None:
                        raise ValueError(f"EmaUpdate: {qname} is quantized (zero_quantized_nontrainable_weights); "
                                         f"not supported for momentum copies")
                    if getattr(q, "ds_secondary_tensor", None) is not None:
                        raise ValueError(f"EmaUpdate: {qname} has a ZeRO++ secondary partition (hpZ); not "
                                         f"supported for momentum copies")
                lp, lq = _local(p), _local(q)
                if lp.shape != lq.shape:
                    raise ValueError(f"EmaUpdate: local data of {name} {tuple(lp.shape)} and of its momentum copy "
                                     f"{qname} {tuple(lq.shape)} differ")
                online.append(p)
                moment.append(q)
                shadows.append(lq.detach().float().clone())
                self.names.append(qname)
            self.coefficients[path] = sub.coefficient
            self._groups.append((sub.coefficient, online, moment, shadows))
            self._momentum += moment
        if len(set(self.names)) != len(self.names):
            raise ValueError("EmaUpdate: a momentum parameter is reached from two MomentumCopies")

    @property
    def shadows(self) -> list[torch.Tensor]:
        return [s for _, _, _, group in self._groups for s in group]

    def __len__(self) -> int:
        return len(self.names)

    @torch.no_grad()
    def __call__(self, engine, applied: bool) -> None:
        """After-step hook: average when the optimizer step was applied; a skipped step changes nothing."""
        if not applied:
            return
        for m, online, moment, shadows in self._groups:
            for i in range(0, len(shadows), _CHUNK):
                sh = shadows[i:i + _CHUNK]
                on = [_local(p).float() for p in online[i:i + _CHUNK]]
                torch._foreach_mul_(sh, m)
                torch._foreach_add_(sh, on, alpha=1.0 - m)
                for q, s in zip(moment[i:i + _CHUNK], sh):
                    _local(q).copy_(s)
        _refresh_gathered(self._momentum)

    def state_dict(self) -> dict:
        """{"names", "coefficients", "shadows"}: this rank's fp32 shadows (its partitions under ZeRO-3), on CPU."""
        return {"names": list(self.names), "coefficients": dict(self.coefficients),
                "shadows": [s.detach().cpu().clone() for s in self.shadows]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the shadows and write them into the momentum parameters' local data. The coefficients saved are
        informational (a resumed run may change m). Under ZeRO-3 every rank must call it (collective)."""
        if not isinstance(state, dict) or not isinstance(state.get("names"), list) \
                or not isinstance(state.get("shadows"), list):
            raise ValueError("momentum state: expected a dict with 'names' and 'shadows' lists")
        names, saved = state["names"], state["shadows"]
        if names != self.names:
            i = next(i for i in range(max(len(names), len(self.names)))
                     if i >= min(len(names), len(self.names)) or names[i] != self.names[i])
            have = names[i] if i < len(names) else "<none>"
            want = self.names[i] if i < len(self.names) else "<none>"
            raise ValueError(f"momentum state: parameter names differ from the model's ({len(names)} saved, "
                             f"{len(self.names)} in the model; #{i}: saved {have!r}, model {want!r})")
        if len(saved) != len(names):
            raise ValueError(f"momentum state: {len(saved)} shadows for {len(names)} names")
        shadows = self.shadows
        for name, s, mine in zip(names, saved, shadows):
            if not torch.is_tensor(s) or s.shape != mine.shape:
                got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
                raise ValueError(f"momentum state: {name}: saved shadow {got} but this rank's is {tuple(mine.shape)}"
                                 f" (different world size or ZeRO stage?)")
        for s, mine in zip(saved, shadows):
            mine.copy_(s)
        for _, _, moment, group in self._groups:
            for q, s in zip(moment, group):
                _local(q).copy_(s)
        _refresh_gathered(self._momentum)


class QueueState:
    """Checkpoint part for every FeatureQueue in `module`: {dotted module name: {"features", "ptr"}}.

    The queues are also buffers of the model (so DeepSpeed's module state holds them too); this part restores
    them exactly and checks their names and shapes, like the other parts."""

    def __init__(self, module: nn.Module):
        module = _unwrap(module)
        self.queues: dict[str, FeatureQueue] = {n: m for n, m in module.named_modules() if isinstance(m, FeatureQueue)}

    def state_dict(self) -> dict:
        return {n: {"features": q.features.detach().cpu().clone(), "ptr": q.ptr.detach().cpu().clone()}
                for n, q in self.queues.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError("queue state: expected a dict of queue name -> {features, ptr}")
        if set(state) != set(self.queues):
            missing, extra = sorted(set(self.queues) - set(state)), sorted(set(state) - set(self.queues))
            raise ValueError(f"queue state: queue names differ: missing {missing}, unexpected {extra}")
        for name, q in self.queues.items():
            s = state[name]
            if not isinstance(s, dict) or set(s) != {"features", "ptr"}:
                raise ValueError(f"queue state: {name}: expected keys 'features' and 'ptr'")
            for key, mine in (("features", q.features), ("ptr", q.ptr)):
                if not torch.is_tensor(s[key]) or s[key].shape != mine.shape:
                    got = tuple(s[key].shape) if torch.is_tensor(s[key]) else type(s[key]).__name__
                    raise ValueError(f"queue state: {name}.{key}: saved {got} but the model's is {tuple(mine.shape)}")
            ptr = int(s["ptr"].reshape(-1)[0])
            if not 0 <= ptr < q.size:
                raise ValueError(f"queue state: {name}.ptr {ptr} is outside [0, {q.size})")
        for name, q in self.queues.items():
            q.features.copy_(state[name]["features"])
            q.ptr.copy_(state[name]["ptr"])


def attach_momentum(engine) -> None:
    """Momentum encoders / feature queues, when the model has them (an objective asked for them): the EMA
    after-step hook and their checkpoint parts. A model without them registers nothing (its checkpoints are
    unchanged). DeepSpeed also saves the momentum weights and queue buffers with the model; the parts make the fp32
    shadows (and the queues, explicitly) exact on resume."""
    ema, queues = EmaUpdate(engine.module), QueueState(engine.module)
    if len(ema):
        engine.register_part("momentum", ema)
        engine.add_after_step(ema)
    if queues.queues:
        engine.register_part("queues", queues)
