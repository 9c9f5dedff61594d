"""What every objective shares: its output type and the gather it uses across data-parallel ranks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ObjectiveOutput:
    losses: dict[str, torch.Tensor]  # unweighted, named; names are unique across objectives
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars worth logging


class LocalGather:
    """Single-process stand-in for the all-gather the trainer injects (models never touch torch.distributed)."""

    rank = 0
    world_size = 1

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t
