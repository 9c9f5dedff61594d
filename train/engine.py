"""The one training engine: DeepSpeed init, step loop with accumulation, logging, eval hook, checkpoints, resume.

Pretraining and the later fine-tune scripts share it. The model is any nn.Module whose forward(batch) returns
{"loss": scalar, "losses": {name: scalar}, "stats": {name: scalar}}; the train loader is an infinite iterable with
state_dict()/load_state_dict() so a resumed run continues with exactly the next batches.

A checkpoint is DeepSpeed's model/optimizer/scheduler states plus a list of named stateful parts
(`register_part`): the engine's own "progress" (step, last_eval_step), "loader" (data position) and "rng", and
whatever the caller adds (e.g. feature queues). Callers that add parts or after-step hooks construct the engine
with resume=False, register, then call resume(). Metric records go to train/loggers.py.

Run directory (`output_dir`):
  metrics.jsonl          one JSON object per logged step
  eval.json, eval.jsonl  latest evaluation result, and all of them
  tensorboard/, wandb/   TensorBoard events, W&B files (rank 0; as train.loggers says)
  config.yaml            the validated run config
  checkpoints/latest     name of the newest complete checkpoint, written last and atomically
  checkpoints/best       {"tag", "step", "metric", "value"} of the best evaluation so far (keep_best(metric)); its
                         step_N tag is kept beside the latest ones
  checkpoints/step_N/    DeepSpeed model/optimizer/scheduler states + train_state_rank{R}.pt
                         ({"step", "world_size", "parts": {name: state}}, loadable with weights_only=True)
"""
from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as torch_dist

from datasets.batch import MODALITY, STEP, to_device
from train.checkpoint_io import COMPLETE, CheckpointError, files_for_rank, find_resume_tag, \
    install_safe_checkpoint_engine, remove_stale_tmp, safe_load
from train.config import ConfigError, TrainConfig
from train.distributed import DistInfo, TorchGather, all_reduce_mean, barrier, max_over_ranks
from train.loggers import MetricLogger, build_loggers, check_available
from train.optim import apply_hyperparameters, build_optimizer, build_scheduler

CHECKPOINT_DIR = "checkpoints"
# Config keys whose change on resume cannot be applied to the restored optimizer (its groups are built from them).
RESUME_FIXED = ("train.lr_multipliers", "train.layer_decay")


class TrainingDiverged(RuntimeError):
    """Loss or gradients non-finite for train.max_skipped_steps steps in a row, or non-finite weights at a save;
    the message is the one line shown to the user."""


# ----------------------------------------------------------------------------------------------- ds_config
def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return cfg


def prepare_ds_config(ds: dict, train: TrainConfig, world_size: int, path: str = "ds_config") -> dict:
    """Fill the batch keys from our config and refuse a ds_config that disagrees with it.

    global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size must hold exactly.
    """
    ds = json.loads(json.dumps(ds))   # deep copy
    micro, glob = train.micro_batch_size, train.global_batch_size
    if glob % (micro * world_size):
        raise ConfigError(f"train.global_batch_size {glob} is not a multiple of micro_batch_size {micro} x "
                          f"world size {world_size} = {micro * world_size}")
    gas = glob // (micro * world_size)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas, "train_batch_size": glob}
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(f"{path}: {key} is {have!r} but the run config needs {value} (micro_batch_size {micro}"
                              f" x accumulation {gas} x world size {world_size} = global_batch_size {glob})")
        ds[key] = value
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(f"{path}: remove the \"{block}\" block; the optimizer and LR schedule come from the "
                              f"run config's train section")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: bf16 and fp16 are both enabled")
    # We pass a torch AdamW (no JIT-compiled DS optimizer); ZeRO accepts it only with this flag.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10 ** 9)   # our own logging replaces DeepSpeed's
    return ds


# ----------------------------------------------------------------------------------------------- helpers
def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.startswith(RESUME_FIXED):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain python types, so that it loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def apply_activation_checkpointing(model: torch.nn.Module, policy) -> dict[str, int]:
    """Mark the last k layers of each tower for activation checkpointing (k=-1: all); returns counts per tower."""
    stacks = model.layer_stacks() if hasattr(model, "layer_stacks") else {}
    applied = {}
    for tower in ("vision", "text", "fusion"):
        k = getattr(policy, tower)
        if k == 0:
            continue
        if tower not in stacks:
            raise ConfigError(f"train.activation_checkpointing.{tower}: the model has no {tower} layers")
        layers = list(stacks[tower])
        chosen = layers if k == -1 else layers[max(0, len(layers) - k):]
        for layer in layers:
            layer.activation_checkpointing = False
        for layer in chosen:
            layer.activation_checkpointing = True
        applied[tower] = len(chosen)
    return applied


def held_weights(p: torch.Tensor, rank: int) -> torch.Tensor:
    """The weights of parameter `p` this rank holds: all of it, or under ZeRO-3 the real elements of its partition.
    The last ranks' partitions are padded up to an equal size, and DeepSpeed leaves that padding uninitialised
    (torch.empty), so it may hold NaN bit patterns that are no weights at all."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p
    size = part.numel()
    return part.narrow(0, 0, max(0, min(size, p.ds_numel - rank * size)))


def _check_no_scalar_params(model: torch.nn.Module) -> None:
    # DeepSpeed 0.19.8 broadcasts every parameter as `p.data.view(torch.uint8)` at init, which fails for 0-dim
    # tensors with an unhelpful message; name them instead (models keep such parameters at shape (1,)).
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"0-dim parameters are not supported by DeepSpeed; make them shape (1,): {scalars}")


class FnPart:
    """A checkpoint part made of two functions: get() -> state, set(state)."""

    def __init__(self, get: Callable[[], dict], set: Callable[[dict], None]):
        self.state_dict, self.load_state_dict = get, set


_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.Tensor, torch.nn.Parameter, torch.Size,
                 torch.dtype, torch.device)


def _check_plain(obj, where: str) -> None:
    """TypeError naming the first value that torch.load(weights_only=True) would refuse (it would make the
    checkpoint unresumable, found only at the resume); checked at save time instead."""
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in _PLAIN_LEAVES:
        raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__}; checkpoint parts hold only "
                        "tensors and plain python data (they are read back with weights_only=True)")


class _Window:
    """What the loop sums between two log lines: healthy steps' losses and stats, timings, modality counts."""

    def __init__(self):
        self.seen_video = False   # once a video batch was seen, every record reports the video share
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = self.video = self.steps = 0
        self.data_time = self.step_time = 0.0
        self.start = time.perf_counter()

    def add(self, sums: dict, applied: bool, micro: int, video: int, data_time: float, step_time: float) -> None:
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time
        if applied:   # a skipped step's (non-finite) losses stay out of the means
            for name, value in sums.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.micro += micro
            self.video += video


# ----------------------------------------------------------------------------------------------- engine
class Engine:
    def __init__(self, model: torch.nn.Module, train_cfg: TrainConfig, ds_config: dict, dist: DistInfo,
                 train_loader, output_dir: str, evaluate: Optional[Callable[["Engine"], dict]] = None,
                 run_config: Optional[dict] = None, resume: bool = True):
        """resume=False: the caller registers its parts and hooks, then calls resume()."""
        import deepspeed

        check_available(train_cfg)   # a missing optional logger package: one line on every rank, before the work
        self.cfg = train_cfg
        self.dist = dist
        self.loader = train_loader
        self.output_dir = output_dir
        self.ckpt_dir = os.path.join(output_dir, CHECKPOINT_DIR)
        self.evaluate_hook = evaluate
        self.run_config = run_config or {}
        self.gas = ds_config["gradient_accumulation_steps"]
        self.step = 0
        self.last_eval_step = -1
        self.last_save_step = -1
        self.best_metric: Optional[str] = None   # keep_best(): the eval key whose maximum is kept
        self.best: Optional[dict] = None         # {"tag", "step", "metric", "value"} of the best eval so far
        self._stop_requested = False
        self.ac_applied = apply_activation_checkpointing(model, train_cfg.activation_checkpointing)
        if hasattr(model, "set_gather"):
            model.set_gather(TorchGather(train_cfg.gathered_grad))
        self.num_params = sum(p.numel() for p in model.parameters())
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _check_no_scalar_params(model)
        optimizer = build_optimizer(model, train_cfg)
        self.lr_mult0 = optimizer.param_groups[0]["lr_mult"]
        scheduler = build_scheduler(optimizer, train_cfg)
        self.base_optimizer = optimizer   # the SkippableAdamW that DeepSpeed wraps (ZeRO) or drives (stage 0)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.zero_stage = self.ds.zero_optimization_stage()
        install_safe_checkpoint_engine(self.ds)
        if self.zero_stage in (1, 2):
            # DeepSpeed checks ZeRO-1/2 gradients for inf/NaN only under bf16/fp16; we want it for fp32 too (its
            # skip is agreed across ranks and shows in was_step_applied()). ZeRO-3 checks its norm in any dtype.
            self.ds.optimizer.check_grad_overflow = True
        self.skipped_steps = 0          # optimizer steps skipped for non-finite loss/gradients, whole run
        self._bad_run: list[int] = []   # the current run of consecutive skipped steps
        self._own_grad_norm = None
        if self.ds.bfloat16_enabled():
            self.dtype = torch.bfloat16
        elif self.ds.fp16_enabled():
            self.dtype = torch.float16
        else:
            self.dtype = torch.float32
        self.device = self.ds.device
        if dist.is_main:
            os.makedirs(output_dir, exist_ok=True)
        self._loggers: Optional[list[MetricLogger]] = None   # rank 0, built at the first record
        self._after_step_hooks: list[Callable[["Engine", bool], None]] = []
        self._parts: dict[str, object] = {}
        self._resume_ran = False
        self.resumed_from: Optional[str] = None
        self.register_part("progress", FnPart(self._progress_state, self._load_progress))
        # self.loader is looked up at each call: callers may wrap it after construction
        self.register_part("loader", FnPart(lambda: self.loader.state_dict(), lambda s: self.loader.load_state_dict(s)))
        self.register_part("rng", FnPart(rng_state, set_rng_state))
        if resume:
            self.resume()

    # ------------------------------------------------------------------ public
    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (ZeRO-3 reserves a ~2 GB gradient bucket per engine, and DeepSpeed
        keeps every engine reachable): a process that runs several jobs, like the test suite, would otherwise grow
        until fork() fails. Parameters stay readable (gathered under ZeRO-3); the engine cannot train afterwards."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.ds.destroy()

    def register_part(self, name: str, part) -> None:
        """Checkpoint `part` under `name` in every rank's train_state file: part.state_dict() -> tensors and plain
        python data, part.load_state_dict(state), raising ValueError when the state does not fit this run (shown
        as one ConfigError line). On resume parts are restored after DeepSpeed's weights (a part may overwrite
        model tensors), except the built-in "loader" (before: a changed data layout is refused before the slow
        load) and "rng" (last). Register before resume()."""
        if self._resume_ran:
            raise RuntimeError(f"register_part({name!r}): resume() already ran; construct the Engine with "
                               "resume=False, register parts, then call engine.resume()")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a checkpoint part name must be a non-empty string, got {name!r}")
        if name in self._parts:
            raise ValueError(f"a checkpoint part named {name!r} is already registered")
        if not (callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))):
            raise TypeError(f"checkpoint part {name!r}: needs state_dict() and load_state_dict(state)")
        self._parts[name] = part

    def keep_best(self, metric: str) -> None:
        """After every evaluation whose `metric` (higher is better) beats the best so far, save a checkpoint at that
        step (if none is) and name it in checkpoints/best; pruning keeps it beside the latest `keep_last`."""
        self.best_metric = metric

    def add_after_step(self, fn: Callable[["Engine", bool], None]) -> None:
        """fn(engine, applied) runs on every rank after each optimizer step (engine.step already counts it),
        before logging, eval and save; applied is False for a skipped (non-finite) step. Registration order."""
        self._after_step_hooks.append(fn)

    def resume(self) -> Optional[str]:
        """Restore output_dir's newest intact checkpoint, if any (weights, optimizer, schedule and every registered
        part); returns its tag, None for a fresh start (also in self.resumed_from). Once, before train()."""
        if self._resume_ran:
            raise RuntimeError("engine.resume() already ran")
        self._resume_ran = True
        self.resumed_from = self._maybe_resume()
        return self.resumed_from

    def request_stop(self) -> None:
        """Ask the loop to save and exit after the current step (safe from a signal handler)."""
        self._stop_requested = True

    def to_device(self, batch: dict) -> dict:
        """The batch on the engine's device in its dtype (datasets/batch.py: uint8 pixels are normalised there)."""
        return to_device(batch, self.device, self.dtype)

    def current_lr(self) -> float:
        """LR of the base (multiplier 1) schedule."""
        return self.optimizer.param_groups[0]["lr"] / self.lr_mult0

    def train(self) -> dict:
        if not self._resume_ran:   # constructed with resume=False and resume() not called: never start over
            self.resume()
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self._log_startup()
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not main, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        it = iter(self.loader)
        window = _Window()
        stopped = False
        saved = None
        self.ds.train()
        try:   # a raised error must not leave the bar's half line in front of its message
            while self.step < cfg.max_steps:
                if self._stop_agreed():
                    stopped = True
                    break
                applied = self._train_step(it, window)
                bar.update(1)
                for hook in self._after_step_hooks:
                    hook(self, applied)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    record = self._train_record(window)   # all-reduces: every rank
                    self._log(record, "train")
                    bar.set_postfix_str(self._postfix(record), refresh=False)
                    window.reset()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.last_save_step != self.step:
                    saved = self.save()
        finally:
            bar.close()
        if not stopped and self.last_eval_step != self.step:
            self.evaluate()
        if self.last_save_step != self.step and self.step > 0:
            saved = self.save()
        self._close_loggers()   # each logger flushes every record: a crash before here loses nothing
        in_sync = None
        if cfg.check_ranks_in_sync:   # a full parameter gather under ZeRO-3: only when asked
            in_sync = self.check_ranks_in_sync()
            if main:
                print(f"ranks in sync: {in_sync} (parameter fingerprint {self.param_fingerprint:.17g})", flush=True)
        return {"step": self.step, "stopped": stopped, "ranks_in_sync": in_sync,
                "saved": os.path.basename(saved) if saved else None}

    def _train_step(self, it, window: _Window) -> bool:
        """One optimizer step over `gas` micro batches; True when it was applied (not skipped)."""
        t_step = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        video, data_time = 0, 0.0
        for micro in range(self.gas):
            t0 = time.perf_counter()
            batch = next(it)
            data_time += time.perf_counter() - t0
            video += batch.get(MODALITY) == "video"
            out = self.ds({**self.to_device(batch), STEP: self.step})   # STEP: the step being computed
            loss_bad |= ~torch.isfinite(out["loss"].detach())   # no sync here: read once per step below
            self.ds.backward(out["loss"])
            skip = self._veto_if_nonfinite(loss_bad) if micro == self.gas - 1 else False
            self.ds.step()
            for name, value in self._scalars(out).items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        self.step += 1
        step_time = time.perf_counter() - t_step
        applied = self._after_step(skip)
        window.add(sums, applied, self.gas, video, data_time, step_time)
        return applied

    def _train_record(self, w: _Window) -> dict:
        """The logged record: means over the window's healthy micro batches (and ranks), rates, health."""
        cfg = self.cfg
        elapsed = time.perf_counter() - w.start
        names = sorted(w.sums)
        values = all_reduce_mean(torch.stack([w.sums[n] for n in names]) / w.micro).tolist() if names else []
        rate = cfg.global_batch_size * w.steps / elapsed
        record = {"step": self.step, **dict(zip(names, values)), "lr": self.current_lr(),
                  "samples_per_sec": rate, "samples_per_sec_per_rank": rate / self.dist.world_size,
                  "data_time": w.data_time / w.steps, "step_time": w.step_time / w.steps,
                  "samples_seen": self.step * cfg.global_batch_size, "skipped_steps": self.skipped_steps}
        w.seen_video = w.seen_video or w.video > 0
        if w.seen_video and w.micro:  # mixed or video runs: the share of video micro batches
            record["video_batch_fraction"] = w.video / w.micro
        record.update(self._data_health())
        grad_norm = self.ds.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._own_grad_norm
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if self.dtype == torch.float16:
            record["loss_scale"] = float(self.optimizer.cur_scale)
        return record

    def _log(self, record: dict, prefix: str) -> None:
        """Hand a record to the loggers (rank 0; built on first use, so a run that never logs writes no files)."""
        if not self.dist.is_main:
            return
        if self._loggers is None:
            self._loggers = build_loggers(self.cfg, self.output_dir, self.run_config)
        for logger in self._loggers:
            logger.log(record["step"], record, prefix)

    def _close_loggers(self) -> None:
        for logger in self._loggers or ():
            logger.close()
        self._loggers = None

    def _veto_if_nonfinite(self, loss_bad: torch.Tensor) -> bool:
        """Before the optimizer step: is this step's loss (any micro batch, any rank) or, at ZeRO-0, its gradient
        non-finite? Then the optimizer is told to skip (DeepSpeed's ZeRO optimizers also skip by themselves on
        non-finite gradients). One all-reduce of one number per step. Also measures the stage-0 gradient norm,
        which DeepSpeed only computes when clipping."""
        bad = loss_bad.float()
        sq = None
        if self.zero_stage == 0 and self.dtype != torch.float16:   # fp16 overflow belongs to the loss scaler
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads:
                sq = torch.stack([n.double() for n in torch._foreach_norm(grads)]).pow(2).sum()
                bad = torch.maximum(bad, (~torch.isfinite(sq)).float())
        skip = max_over_ranks(bad) > 0
        self.base_optimizer.skip_next = skip
        self._own_grad_norm = None if sq is None else float(sq.sqrt())
        return skip

    def _after_step(self, vetoed: bool) -> bool:
        """Count skipped steps; stop after train.max_skipped_steps in a row. True when the step was applied."""
        self.base_optimizer.skip_next = False
        skipped = vetoed or not self.ds.was_step_applied()
        if not skipped:
            self._bad_run = []
            return True
        self.skipped_steps += 1
        if vetoed or self.dtype != torch.float16:   # fp16 loss-scale overflows are routine; they do not count
            self._bad_run.append(self.step)
        if self.dist.is_main:
            print(f"\nstep {self.step}: non-finite loss or gradients; update skipped "
                  f"({len(self._bad_run)} in a row, {self.skipped_steps} in total)", flush=True)
        if len(self._bad_run) >= self.cfg.max_skipped_steps:
            raise TrainingDiverged(
                f"training diverged: loss or gradients non-finite at steps {self._bad_run[0]}-{self._bad_run[-1]} "
                f"({len(self._bad_run)} in a row = train.max_skipped_steps); none of them updated the weights; "
                f"{self._latest_note()} (lower train.lr or raise train.warmup_ratio, then rerun)")
        return False

    def _latest_note(self) -> str:
        latest = os.path.join(self.ckpt_dir, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                return f"the newest checkpoint is {os.path.join(self.ckpt_dir, f.read().strip())}"
        return "no checkpoint was written yet"

    def evaluate(self) -> Optional[dict]:
        """Run the eval hook on all ranks (ZeRO-3 needs every rank), RNG-neutral so resumed runs match."""
        if self.evaluate_hook is None:
            return None
        saved = rng_state()
        self.ds.eval()
        try:
            with torch.no_grad():
                result = self.evaluate_hook(self)
        finally:
            self.ds.train()
            set_rng_state(saved)
        self.last_eval_step = self.step
        if self.best_metric is not None and result:
            self._update_best(result)
        if result and self.dist.is_main:
            result = {"step": self.step, **result}
            self._log(result, "eval")
            shown = " ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float))
            print(f"\neval @ step {self.step}: {shown}", flush=True)
        return result

    def _update_best(self, result: dict) -> None:
        """Rank 0 judges (every rank computed the same result, but one decision is certain to agree)."""
        value = result.get(self.best_metric)
        if self.dist.is_main and not isinstance(value, (int, float)):
            print(f"warning: the evaluation has no {self.best_metric!r} (keys: {', '.join(sorted(result))}); "
                  "no best checkpoint is kept", flush=True)
        better = (self.dist.is_main and isinstance(value, (int, float)) and math.isfinite(value)
                  and (self.best is None or value > self.best["value"]))
        if max_over_ranks(better, self.device) <= 0 or self.step == 0:
            return
        self.best = {"tag": f"step_{self.step}", "step": self.step, "metric": self.best_metric,
                     "value": float(value) if self.dist.is_main else None}
        if self.last_save_step != self.step:
            self.save()   # (its pruning already spares the new best and lets the old one go)
        else:
            self._prune(keep=self.best["tag"]) if self.dist.is_main else None
        if self.dist.is_main:
            atomic_write_json(os.path.join(self.ckpt_dir, "best"), self.best)
            print(f"\nnew best {self.best_metric} {value:.4f} at step {self.step} -> "
                  f"{os.path.join(self.ckpt_dir, self.best['tag'])}", flush=True)

    def save(self) -> str:
        """Checkpoint on ALL ranks (ZeRO shards live on each). The tag's COMPLETE marker and then `latest` are
        written only once every rank has written every file; weights that are not finite are never saved."""
        self._check_weights_finite()
        parts = {name: part.state_dict() for name, part in self._parts.items()}
        for name, state in parts.items():
            _check_plain(state, f"checkpoint part {name!r}")
        tag = f"step_{self.step}"
        tag_dir = os.path.join(self.ckpt_dir, tag)
        marker = os.path.join(tag_dir, COMPLETE)
        if self.dist.is_main:
            os.makedirs(tag_dir, exist_ok=True)
            if os.path.exists(marker):   # rewriting a tag (resumed before it): unfinished until marked again
                os.remove(marker)
        barrier()
        os.makedirs(tag_dir, exist_ok=True)
        state = {"step": self.step, "world_size": self.dist.world_size, "parts": parts}
        atomic_torch_save(state, os.path.join(tag_dir, f"train_state_rank{self.dist.rank}.pt"))
        # client_state is for tools (convert_checkpoint's step and config, the config-change check); resume
        # reads its progress from the parts above
        self.ds.save_checkpoint(self.ckpt_dir, tag=tag, save_latest=False,
                                client_state={"step": self.step, "config": self.run_config})
        barrier()
        if self.dist.is_main:
            atomic_write_json(marker, {"step": self.step, "world_size": self.dist.world_size})
            atomic_write_bytes(os.path.join(self.ckpt_dir, "latest"), tag.encode())
            self._prune(keep=tag)
        barrier()
        self.last_save_step = self.step
        return tag_dir

    def _check_weights_finite(self) -> None:
        """Every rank checks the parameters it holds (its partition under ZeRO-3); agreed by one all-reduce."""
        held = [held_weights(p, self.dist.rank) for p in self.module.parameters()]
        flags = [torch.isfinite(t.detach()).all() for t in held if t.numel()]
        bad = ~torch.stack(flags).all() if flags else torch.zeros((), device=self.device)
        if max_over_ranks(bad) > 0:
            raise TrainingDiverged(f"training diverged: the weights hold inf/NaN at step {self.step}; not saving "
                                   f"them; {self._latest_note()} (lower train.lr, then rerun)")

    def check_ranks_in_sync(self) -> bool:
        """All ranks hold bit-identical parameters (fingerprint per tensor, gathered under ZeRO-3)."""
        import deepspeed
        prints = []
        for p in self.module.parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=self.zero_stage == 3):
                t = p.detach().double().flatten()
                prints.append(torch.stack([t.sum(), t.abs().sum(), (t * t).sum(), t[0], t[-1]]))
        mine = torch.cat(prints)
        peers = [torch.zeros_like(mine) for _ in range(self.dist.world_size)]
        torch_dist.all_gather(peers, mine)
        # sum over tensors (in parameters() order) of sum |w|, in float64: a converted checkpoint can be checked
        # against it (`python -c` over model.parameters() gives the same number for the same weights)
        self.param_fingerprint = float(peers[0].view(-1, 5)[:, 1].sum())
        return all(torch.equal(peers[0], p) for p in peers)

    # ------------------------------------------------------------------ internals
    def _scalars(self, out: dict) -> dict:
        vals = {"loss": out["loss"]}
        for name, v in out.get("losses", {}).items():
            vals[f"loss_{name}"] = v
        for name, v in out.get("stats", {}).items():
            vals[name if name not in vals else f"stat_{name}"] = v
        return {k: (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().reshape(()).to(self.device)
                for k, v in vals.items()}

    def _data_health(self) -> dict:
        """Bad samples skipped so far, summed over ranks (the loader counts per rank, as of the consumed batches)."""
        if not hasattr(self.loader, "stats"):
            return {}
        s = self.loader.stats()
        totals = all_reduce_mean(torch.tensor([float(s["bad_samples"]), float(s["samples_read"])],
                                              device=self.device)) * self.dist.world_size
        bad, read = totals.tolist()
        return {"data_bad_samples": int(round(bad)), "data_bad_fraction": bad / read if read else 0.0}

    def _stop_agreed(self) -> bool:
        return max_over_ranks(self._stop_requested, self.device) > 0

    def _maybe_resume(self) -> Optional[str]:
        """Resume from `latest`, or from the newest intact checkpoint before it (with a warning naming what was
        wrong); every file is read with weights_only=True. A fresh start drops log lines of a run that died
        before its first checkpoint."""
        main = self.dist.is_main
        if main:
            for path in remove_stale_tmp(self.ckpt_dir):
                print(f"removed {path} (left by a writer that was killed)", flush=True)

        def agree(verdict: int) -> int:
            return int(max_over_ranks(verdict, self.device))

        def warn(msg: str) -> None:
            if main:
                print(f"warning: {msg}", flush=True)

        tag = find_resume_tag(self.ckpt_dir, self.dist.rank, self.dist.world_size, agree, warn)
        if tag is None:
            if main:
                self._truncate_logs(0)
            return None
        tag_dir = os.path.join(self.ckpt_dir, tag)
        own = os.path.join(tag_dir, f"train_state_rank{self.dist.rank}.pt")
        state = safe_load(own)
        if not isinstance(state, dict) or state.get("world_size") != self.dist.world_size:
            raise CheckpointError(f"{own}: not a train state of a {self.dist.world_size}-rank run")
        saved = state.get("parts")
        if not isinstance(saved, dict):
            raise ConfigError(f"{tag_dir}: its train state has no named parts (written by an older version); use "
                              "a new --output_dir")
        missing = [name for name in self._parts if name not in saved]
        if missing:
            raise ConfigError(f"{tag_dir}: written by a run without {missing[0]!r}; use a new --output_dir")
        for name in saved:
            if name not in self._parts:
                warn(f"{own}: ignoring its part {name!r} (nothing in this run restores it)")
        changed = self._config_changes(tag)   # before the (slow) model load, like the data layout check below
        self._load_part("loader", saved, tag_dir)   # a changed data layout is the commonest resume mistake
        try:
            path, _ = self.ds.load_checkpoint(self.ckpt_dir, tag=tag)
        except RuntimeError as e:  # strict load: keys or shapes differ from this run's model
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            first = " ".join(lines[:2])[:400] if lines else type(e).__name__  # torch: header + missing/unexpected keys
            raise ConfigError(f"{tag_dir}: does not fit this run's model (written with another "
                              f"model/objectives config? use a new --output_dir): {first}") from None
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
        apply_hyperparameters(self.scheduler.optimizer, self.scheduler, self.cfg)
        if changed and main:
            print(f"resume: the config differs from {tag}'s; applying the new values: {changed}", flush=True)
        # after the weights (a part may overwrite model tensors); the RNG last, whatever the others draw
        for name in [n for n in self._parts if n not in ("loader", "rng")] + ["rng"]:
            self._load_part(name, saved, tag_dir)
        if main:
            self._truncate_logs(self.step)
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)
        return tag

    def _load_part(self, name: str, saved: dict, tag_dir: str) -> None:
        try:
            self._parts[name].load_state_dict(saved[name])
        except ValueError as e:   # the saved state does not fit this run (data layout, queue sizes): one line
            what = "" if name == "loader" else f"checkpoint part {name!r}: "   # the loader's messages name the key
            raise ConfigError(f"resuming {tag_dir}: {what}{e}") from None

    def _config_changes(self, tag: str) -> str:
        """What differs between the checkpoint's run config and this run's, as one printable line. Optimizer
        settings are put into the restored optimizer and schedule after the load (they would otherwise keep the
        saved values); the few changes a restored run cannot take are refused here."""
        tag_dir = os.path.join(self.ckpt_dir, tag)
        states = [p for p in files_for_rank(tag_dir, self.dist.rank) if "model_states" in os.path.basename(p)]
        saved = safe_load(states[0], mmap=True)
        before = _flatten(saved.get("config") or {} if isinstance(saved, dict) else {})
        new = _flatten(self.run_config)
        changed = [k for k in sorted(set(new) | set(before))
                   if new.get(k) != before.get(k) and k != "train.output_dir"]
        fixed = [k for k in changed if k.startswith(RESUME_FIXED)]
        if fixed:
            k = fixed[0]
            raise ConfigError(f"{k}: was {before.get(k)!r} in {tag_dir}, now {new.get(k)!r}; the restored "
                              "optimizer's parameter groups are built from it (restore it, or start a new --output_dir)")
        shown = ", ".join(f"{k} {before.get(k)!r} -> {new.get(k)!r}" for k in changed[:12])
        return shown + (f" (+{len(changed) - 12} more)" if len(changed) > 12 else "")

    def _truncate_logs(self, step: int) -> None:
        """Drop log lines past `step` (the dead run's, to be redone) and a torn last line (died mid-write)."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = os.path.join(self.output_dir, name)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines(keepends=True)
            keep, torn = [], 0
            for ln in lines:
                try:
                    rec = json.loads(ln)
                except ValueError:
                    torn += ln.strip() != ""
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
            if keep != lines:
                if torn:
                    print(f"warning: {path}: dropped {torn} unreadable line(s) (a write cut short)", flush=True)
                atomic_write_bytes(path, "".join(keep).encode())

    def _prune(self, keep: str) -> None:
        tags = []
        for name in os.listdir(self.ckpt_dir):
            m = re.fullmatch(r"step_(\d+)", name)
            if m and os.path.isdir(os.path.join(self.ckpt_dir, name)):
                tags.append((int(m.group(1)), name))
        tags.sort()
        best = self.best["tag"] if self.best else None
        for _, name in tags[:-self.cfg.keep_last]:
            if name not in (keep, best):
                shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)

    def _progress_state(self) -> dict:
        state = {"step": self.step, "last_eval_step": self.last_eval_step}
        if self.best is not None:
            state["best"] = dict(self.best)
        return state

    def _load_progress(self, state: dict) -> None:
        self.step, self.last_eval_step = state["step"], state["last_eval_step"]
        self.best = state.get("best")
        self.last_save_step = self.step

    @staticmethod
    def _postfix(r: dict) -> str:
        parts = [f"loss {r['loss']:.3f}"] if "loss" in r else ["skipped"]
        parts += [f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("loss_")]
        parts.append(f"{r['samples_per_sec']:.1f} samples/s")
        return " ".join(parts)

    def _log_startup(self) -> None:
        prec = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        c = self.cfg
        ac = ", ".join(f"{k} {v}" for k, v in self.ac_applied.items()) or "off"
        print(f"world {self.dist.world_size} x micro {c.micro_batch_size} x accumulation {self.gas} = global batch "
              f"{c.global_batch_size} | {prec} | ZeRO {self.zero_stage} | {self.num_params / 1e6:.1f}M params "
              f"({self.num_trainable / 1e6:.1f}M trainable) | activation checkpointing: {ac} | "
              f"{c.max_steps} steps -> {self.output_dir}", flush=True)
