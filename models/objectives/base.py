"""What every objective shares: its output type and the gather it uses across data-parallel ranks."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ObjectiveOutput(NamedTuple):
    """A NamedTuple so ZeRO-3's module hooks see the tensors (they walk tuples, lists and dicts, not dataclasses)."""

    losses: dict[str, torch.Tensor]  # unweighted, named; names are unique across objectives
    stats: dict[str, torch.Tensor] = {}  # detached scalars worth logging (never mutated)


class LocalGather:
    """Single-process stand-in for the all-gather the trainer injects (models never touch torch.distributed)."""

    rank = 0
    world_size = 1

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t


def check_weight(name: str, value: float) -> None:
    """Config validation shared by the objectives: a loss weight is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
