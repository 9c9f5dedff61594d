"""Where the engine's metric records go: `train.loggers` picks any of JSONL, TensorBoard and Weights & Biases.

The engine computes one record per logged step ({"step": N, "loss": ..., ...}) and one per evaluation, and hands
each to every logger with a prefix, "train" or "eval". Only rank 0 builds and calls loggers.

  jsonl        metrics.jsonl (train), eval.jsonl + eval.json (eval, eval.json = the latest) in the output dir;
               always on: resume truncates these files back to the checkpoint's step
  tensorboard  <output_dir>/tensorboard, scalars train/<key> and eval/<key>
  wandb        optional (`pip install wandb`), train.wandb: project, name, mode (offline/online), dir

This module imports neither torch nor wandb at import time (train.config reads LOGGER_NAMES from it).
"""
from __future__ import annotations

import json
import os
import secrets

from train.config import ConfigError, TrainConfig


class MetricLogger:
    """A destination for metric records. `record` holds "step" and numbers (eval records may hold other values);
    `prefix` is "train" or "eval"."""

    def log(self, step: int, record: dict, prefix: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(MetricLogger):
    FILES = {"train": "metrics.jsonl", "eval": "eval.jsonl"}

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def log(self, step: int, record: dict, prefix: str) -> None:
        if prefix == "eval":
            from train.engine import atomic_write_json   # engine imports this module: import here, not at the top
            atomic_write_json(os.path.join(self.output_dir, "eval.json"), record)
        # opened per line, so a killed run leaves at most one torn line (dropped on resume)
        with open(os.path.join(self.output_dir, self.FILES[prefix]), "a") as f:
            f.write(json.dumps(record) + "\n")


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLogger(MetricLogger):
    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, record: dict, prefix: str) -> None:
        for k, v in _numbers(record).items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """One W&B run per output dir: its id is kept in <dir>/run_id so a resumed (requeued) run continues it. The
    steps a resume redoes were already logged with the same values (exact resume); W&B drops them."""

    def __init__(self, cfg: TrainConfig, output_dir: str, run_config: dict):
        wandb = _import_wandb()
        w = cfg.wandb
        directory = w.dir or os.path.join(output_dir, "wandb")
        os.makedirs(directory, exist_ok=True)
        id_path = os.path.join(directory, "run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)   # W&B run ids are free-form lowercase alphanumerics
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self.wandb = wandb
        try:
            self.run = wandb.init(project=w.project, name=w.name, mode=w.mode, dir=directory, id=run_id,
                                  resume="allow", config=run_config)
        except Exception as e:   # no network in online mode, a bad API key, ...: one line, not a traceback
            msg = " ".join(str(e).split())[:300]
            raise ConfigError(f"train.loggers: wandb could not start its run ({type(e).__name__}: {msg}); "
                              f"try train.wandb.mode=offline, or remove wandb from train.loggers") from None

    def log(self, step: int, record: dict, prefix: str) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in _numbers(record).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


LOGGER_NAMES = ("jsonl", "tensorboard", "wandb")


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.loggers: 'wandb' is requested but the wandb package is not installed "
                          "(pip install wandb, or remove wandb from train.loggers)") from None
    return wandb


def check_available(cfg: TrainConfig) -> None:
    """The optional loggers' packages import (ConfigError naming train.loggers otherwise). Call it on every rank
    before heavy work: only rank 0 builds loggers, but all ranks must stop together."""
    if "wandb" in cfg.loggers:
        _import_wandb()


def build_loggers(cfg: TrainConfig, output_dir: str, run_config: dict) -> list[MetricLogger]:
    """The loggers `cfg.loggers` names, in that order (rank 0 only)."""
    make = {"jsonl": lambda: JsonlLogger(output_dir), "tensorboard": lambda: TensorBoardLogger(output_dir),
            "wandb": lambda: WandbLogger(cfg, output_dir, run_config)}
    return [make[name]() for name in cfg.loggers]
