"""Image-text alignment with momentum distillation (ITA): ALBEF's ITC as SIMLA uses it. methods.md §2.2 item 1.

    v, t     = online retrieval embeddings (backbone ITC head, L2-normalised) of this rank's batch
    v_m, t_m = the same through the momentum (EMA) encoders, no gradient
    s_i2t    = v [t_m ; Q_t]^T / tau         s_t2i = t [v_m ; Q_v]^T / tau
    targets  = alpha * softmax(s_m) + (1 - alpha) * onehot,   s_m = the same scores with v_m / t_m as the rows
    L_ITA    = (CE_soft(s_i2t, y_i2t) + CE_soft(s_t2i, y_t2i)) / 2
As in ALBEF, the in-batch columns are this rank's momentum features (not gathered); the queues Q hold earlier steps'
momentum features gathered from every rank (rank order), enqueued after the loss. tau is the backbone's learnable
temperature (`model.itc`; SIMLA clamps it to [0.001, 0.5]: set model.itc.min_temperature 0.001). alpha ramps
linearly from 0 over the first `alpha_warmup_steps` optimizer steps (ALBEF: alpha * min(1, i / len(loader)) in
epoch 0). Publishes s_i2t / s_t2i against the in-batch columns for ITM's hard negatives (ALBEF samples them so).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.momentum import FeatureQueue
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import ContrastiveScores, ImageEncoding, MomentumEncoding, Scores, TextEncoding


@dataclass
class ItaConfig:
    weight: float = 1.0
    alpha: float = 0.4              # distillation weight of the momentum targets
    alpha_warmup_steps: int = 0     # alpha ramps 0 -> alpha over these optimizer steps (0: constant)
    momentum: float = 0.995         # EMA coefficient of the momentum encoders
    queue_size: int = 65536         # 0: no queue (in-batch momentum features only)

    def validate(self) -> None:
        check_weight("objectives.ita.weight", self.weight)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"objectives.ita.alpha must be in [0, 1], got {self.alpha}")
        if self.alpha_warmup_steps < 0:
            raise ValueError(f"objectives.ita.alpha_warmup_steps must be >= 0, got {self.alpha_warmup_steps}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"objectives.ita.momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 0:
            raise ValueError(f"objectives.ita.queue_size must be >= 0, got {self.queue_size}")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


class ITA(Objective):
    name, Config = "ita", ItaConfig
    reads = (ImageEncoding, TextEncoding, MomentumEncoding)
    publishes = (ContrastiveScores,)
    heads = ("itc",)

    def __init__(self, cfg: ItaConfig, env: BuildEnv):
        super().__init__(cfg, env)
        env.use(MomentumEncoding, coefficient=cfg.momentum)
        dim = env.backbone.itc.cfg.embed_dim
        if cfg.queue_size:
            self.image_queue = FeatureQueue(cfg.queue_size, dim)
            self.text_queue = FeatureQueue(cfg.queue_size, dim)

    @classmethod
    def check_run(cls, cfg, run) -> None:
        g = run.train.global_batch_size
        if cfg.queue_size % g:
            raise ValueError(f"objectives.ita.queue_size: {cfg.queue_size} is not a multiple of train.global_batch_size"
                             f" {g} (every micro step enqueues micro_batch_size x world size features)")

    def alpha_at(self, step) -> float:
        c = self.cfg
        if step is None or c.alpha_warmup_steps == 0:
            return c.alpha
        return c.alpha * min(1.0, float(step) / c.alpha_warmup_steps)

    def forward(self, ctx) -> ObjectiveOutput:
        v, t, tau = ctx.model.itc(ctx.image.global_, ctx.text[:, 0])
        mom = ctx.get(MomentumEncoding)
        b = v.shape[0]
        queued = self.cfg.queue_size > 0
        with torch.no_grad():
            t_all = torch.cat([mom.text, self.text_queue.features]) if queued else mom.text
            v_all = torch.cat([mom.image, self.image_queue.features]) if queued else mom.image
            alpha = self.alpha_at(ctx.step)
            onehot = torch.zeros(b, t_all.shape[0], device=v.device)
            onehot[:, :b] = torch.eye(b, device=v.device)
            y_i2t = alpha * F.softmax(mom.image @ t_all.T / tau, dim=1) + (1 - alpha) * onehot
            y_t2i = alpha * F.softmax(mom.text @ v_all.T / tau, dim=1) + (1 - alpha) * onehot
        s_i2t = v @ t_all.T / tau
        s_t2i = t @ v_all.T / tau
        loss = (soft_cross_entropy(s_i2t, y_i2t) + soft_cross_entropy(s_t2i, y_t2i)) / 2
        ctx.publish(ContrastiveScores, Scores(s_i2t[:, :b].detach(), s_t2i[:, :b].detach()))
        if queued:
            with torch.no_grad():
                self.image_queue.enqueue(ctx.gather(mom.image))
                self.text_queue.enqueue(ctx.gather(mom.text))
        return ObjectiveOutput({"ita": loss}, {"ita_temperature": tau.detach(),
                                               "ita_alpha": torch.tensor(alpha, device=v.device)})
