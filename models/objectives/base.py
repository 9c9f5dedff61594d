"""What every objective shares: the Objective declaration, its output type and the build environment.

An objective is one file holding its config dataclass and an `Objective` subclass that declares:
  name           the key under `objectives:` in a run config (and in models/objectives/__init__.py's registry)
  Config         its config dataclass (validated by `validate()`; every config has a finite `weight` >= 0)
  reads          the shared passes it reads (models/passes.py, or its own file's); `publishes`: those it writes
  heads          the backbone heads it uses ("itc", "itm"); the backbone builds them
  pretrain_only  True: `convert_checkpoint.py to-finetune` drops its parameters and its config entry
  batch_keys     optional batch keys it reads (datasets/batch.py), e.g. MLM's collator-masked text
  families       the model families (model.family) it works with; default both
and implements `forward(ctx) -> ObjectiveOutput` (unweighted, named losses). Optional class methods:
`official_config(cfg)` (the setting the official code's cost corresponds to, for train/flops.py) and
`check_run(cfg, run)` (rules against the rest of the run config).
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn as nn


class ObjectiveOutput(NamedTuple):
    """A NamedTuple so ZeRO-3's module hooks see the tensors (they walk tuples, lists and dicts, not dataclasses)."""

    losses: dict[str, torch.Tensor]  # unweighted, named; names are unique across objectives
    stats: dict[str, torch.Tensor] = {}  # detached scalars worth logging (never mutated)


class BuildEnv:
    """What an objective's constructor may use: the backbone being built, the tokenizer, the shared passes."""

    def __init__(self, backbone: nn.Module, tokenizer):
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.passes: dict[str, nn.Module] = {}
        self.momentum_modules: dict[str, float] = {}   # submodule path -> EMA coefficient (objective-owned heads)

    @property
    def special_ids(self) -> list[int]:
        return sorted({int(i) for i in self.tokenizer.all_special_ids})

    def momentum_copy(self, name: str, coefficient: float) -> None:
        """Ask for a momentum (EMA) copy of submodule `name` of the model being built (a dotted path from it, e.g.
        "objectives.xmm_image.head"); the model copies it with the shared passes' momentum modules, at the end."""
        self.momentum_modules[name] = coefficient

    def use(self, kind: type, **settings):
        """The one instance of shared pass `kind` for this model (created on first use), with these settings."""
        inst = self.passes.get(kind.name)
        if inst is None:
            inst = self.passes[kind.name] = kind.create(self, **settings)
        else:
            inst.configure(**settings)
        return inst


class Objective(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    reads: ClassVar[tuple[type, ...]] = ()
    publishes: ClassVar[tuple[type, ...]] = ()
    heads: ClassVar[tuple[str, ...]] = ()
    pretrain_only: ClassVar[bool] = True
    batch_keys: ClassVar[tuple[str, ...]] = ()
    families: ClassVar[tuple[str, ...]] = ("coattention", "single_stream")

    def __init__(self, cfg, env: BuildEnv):
        super().__init__()
        cfg.validate()
        self.cfg = cfg

    @classmethod
    def official_config(cls, cfg):
        return cfg

    @classmethod
    def check_run(cls, cfg, run: Any) -> None:
        """Raise ValueError("dotted.key: message") when `cfg` cannot work with the run config `run`."""

    @classmethod
    def momentum_coefficient(cls, cfg) -> Optional[float]:
        """The EMA coefficient of the momentum encoders this objective uses (its `momentum` key), None when it uses
        none. There is one set of momentum encoders per model, so every user must give the same value."""
        return getattr(cfg, "momentum", None)

    def no_weight_decay(self) -> set[str]:
        return set()


def check_weight(name: str, value: float) -> None:
    """Config validation shared by the objectives: a loss weight is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
