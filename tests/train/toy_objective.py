"""A toy objective written the way a new one is added: this file (config + Objective declaring what it reads, its
heads and that it is pretraining-only) and one registry entry (the test adds it to models.objectives.OBJECTIVES)."""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import ImageEncoding, TextEncoding


@dataclass
class ToyConfig:
    weight: float = 1.0
    dim: int = 8

    def validate(self) -> None:
        check_weight("objectives.toy.weight", self.weight)
        if self.dim < 1:
            raise ValueError(f"objectives.toy.dim must be >= 1, got {self.dim}")


class Toy(Objective):
    """Pull the projected image and text globals together in a small space of its own."""
    name, Config = "toy", ToyConfig
    reads = (ImageEncoding, TextEncoding)

    def __init__(self, cfg: ToyConfig, env: BuildEnv):
        super().__init__(cfg, env)
        d = env.backbone.fusion.hidden_size
        self.image = nn.Linear(d, cfg.dim)
        self.text = nn.Linear(d, cfg.dim)

    def forward(self, ctx) -> ObjectiveOutput:
        loss = F.mse_loss(self.image(ctx.image.global_).float(), self.text(ctx.text[:, 0]).float())
        return ObjectiveOutput({"toy": loss})
