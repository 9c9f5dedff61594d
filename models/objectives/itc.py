"""Image-text contrastive loss (ITC) over the batch gathered from every rank.

Each rank scores its own rows against all gathered columns (labels offset by rank); the trainer's gather carries the
gradient back to the rank that produced each column, so the result equals the full-batch loss. The temperature is
learnable, stored as log(1/tau) and clamped to [min_temperature, max_temperature] (SCL divides by a raw, unclamped
parameter, which can run to zero or negative; we keep it in range instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads import ProjectionHead
from models.objectives.base import ObjectiveOutput, check_weight


@dataclass
class ItcConfig:
    weight: float = 1.0
    embed_dim: int = 256
    init_temperature: float = 0.07
    min_temperature: float = 0.01
    max_temperature: float = 0.5

    def validate(self) -> None:
        check_weight("objectives.itc.weight", self.weight)
        if self.embed_dim < 1:
            raise ValueError(f"objectives.itc.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise ValueError("objectives.itc: need 0 < min_temperature <= init_temperature <= max_temperature")


class ITC(nn.Module):
    def __init__(self, cfg: ItcConfig, dim: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.image_proj = ProjectionHead(dim, cfg.embed_dim)
        self.text_proj = ProjectionHead(dim, cfg.embed_dim)
        # Shape (1,), not 0-dim: DeepSpeed 0.19 cannot broadcast 0-dim parameters at init.
        self.log_inv_temperature = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))

    def no_weight_decay(self) -> set[str]:
        return {"log_inv_temperature"}

    def embed_image(self, image_global: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image_global).float(), dim=-1)

    def embed_text(self, text_global: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_global).float(), dim=-1)

    def temperature(self) -> torch.Tensor:
        c = self.cfg
        return 1.0 / self.log_inv_temperature.float().clamp(math.log(1 / c.max_temperature),
                                                            math.log(1 / c.min_temperature)).exp().squeeze(0)

    def forward(self, ctx) -> ObjectiveOutput:
        zi, zt = self.embed_image(ctx.image_global), self.embed_text(ctx.text_global)
        all_i, all_t = ctx.gather(zi), ctx.gather(zt)
        tau = self.temperature()
        labels = torch.arange(zi.shape[0], device=zi.device) + ctx.gather.rank * zi.shape[0]
        i2t = zi @ all_t.T / tau
        t2i = zt @ all_i.T / tau
        loss = (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
        # Local similarities feed ITM's hard-negative sampling.
        local = slice(ctx.gather.rank * zi.shape[0], (ctx.gather.rank + 1) * zi.shape[0])
        ctx.cache["itc_sim_i2t"] = i2t[:, local].detach()
        ctx.cache["itc_sim_t2i"] = t2i[:, local].detach()
        return ObjectiveOutput({"itc": loss}, {"itc_temperature": tau.detach()})
