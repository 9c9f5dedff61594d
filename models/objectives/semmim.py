"""SemMIM (Liu et al., LREC-COLING 2024): semantics-enhanced, text-involved masked image modelling. methods.md §3.

No code or hyperparameters were released; this is the reconstruction of methods.md §3 for the coattention family.
One encoding space: a head h (3-layer MLP -> L2-normalised bottleneck -> cosine with K L2-normalised prototypes C)
shared by global and patch features; h_m, the momentum copies (EMA) of the encoders, fusion F and head; no gradient.

  teacher (full image + caption, no grad):  v_m = ViT_m(I),  (z_m, A) = F_m(caption_m, v_m)
      r_i   = A[CLS -> patch i], last momentum fusion layer, heads averaged       ("words": mean over word queries)
      q_g   = softmax((h_m(v_m[CLS]) - c_g) / tau_t)                              global target
      q_i   = softmax((h_m(z_m[i])   - c_p) / tau_t)                              text-injected patch targets
  mask M:   round(mask_ratio N) patches, round(text_guided_ratio |M|) of them drawn without replacement with
            probability ∝ r_i, the rest uniformly                              (models/masking.py text_guided_mask)
  student:  v = ViT(I with the ViT's mask token at M),  z = F(caption, v)      (text fused during masked modelling)
      p_g = log_softmax(h(v[CLS]) / tau_s),   p_i = log_softmax(h(pred(z[i])) / tau_s)
  L = agree_weight * (-sum_k q_g log p_g)  +  mim_weight * mean_{i in M}(-sum_k q_i log p_i)     (batch means)
  after the loss: c <- center_momentum c + (1 - center_momentum) mean over every rank's batch of the teacher logits
                  (c_g over global logits, c_p over all patch logits; DINO/iBOT centering against collapse), in
                  train mode only, once per micro-batch
  `centering: sinkhorn` replaces softmax((l - c) / tau_t) by Sinkhorn-Knopp over every rank's rows (SwAV, DINOv2):
      each prototype gets an equal share of the batch's images (q_g) or masked patches (q_i). The centers are still
      updated and logged. Measured on the demo: DINO centering lets a fast (EMA 0.9) teacher collapse onto ~2 of 256
      prototypes within 40 steps (the EMA center lags the teacher); Sinkhorn keeps them in use (README).
Features entering h: the ViT CLS through the fusion's image input projection (global, `global_feature: vision`) or
the fusion's image-stream CLS (`fusion`), and the fusion's image-stream patch outputs; all of width model.fusion.
Softmaxes, centering and the centers (float32 buffers, saved with the model) stay in float32 under bf16.

Ours (the paper leaves them open), as config keys: K, the head sizes, both temperatures (DINO's), the centering and
the center momentum, the mask ratio, the guided fraction, the relevance source, the global feature, the predictor
(default: the shared head itself) and every loss weight; fixed in code: separate global and patch centers (iBOT) and the momentum
text tower encoding the targets' caption. Video (F frames): tube masking (the same patch positions masked in every
frame, drawn from the frame-averaged relevance), the global feature is the mean of the frame CLS tokens, and every
frame's masked patches are MIM rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.masking import text_guided_mask
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.passes import MomentumEncoding, TextEncoding
from models.relevance import MomentumFusion

MASK_TOKEN_NEEDED = "objectives.semmim: needs the ViT's mask token (set model.vision.mask_token: true)"


@dataclass
class SemmimConfig:
    weight: float = 1.0
    agree_weight: float = 1.0        # ours: global agreement loss weight
    mim_weight: float = 1.0          # ours: masked patch loss weight
    num_prototypes: int = 1024       # ours: K, the size of the encoding space (the paper: "K-dimensional")
    proj_dim: int = 256              # ours: the head's L2-normalised bottleneck (DINO's 256)
    proj_hidden: int = 2048          # ours: the head's 3-layer MLP hidden width (DINO's 2048)
    student_temp: float = 0.1        # ours: DINO's student temperature
    teacher_temp: float = 0.04       # ours: DINO's teacher temperature (its warm-up start), sharper than the student
    teacher_temp_start: Optional[float] = None   # ours: null = constant; else ramps linearly to teacher_temp ...
    teacher_temp_warmup_steps: int = 0           # ... over these optimizer steps (DINO's warm-up)
    center_momentum: float = 0.9     # ours: DINO's center EMA
    centering: Literal["mean", "sinkhorn"] = "mean"   # ours: DINO's EMA center, or Sinkhorn-Knopp (SwAV, DINOv2)
    sinkhorn_iters: int = 3          # ours: Sinkhorn-Knopp iterations (SwAV's and DINOv2's 3)
    momentum: float = 0.995          # ours: the momentum encoders' EMA (ALBEF's); must equal other momentum users'
    mask_ratio: float = 0.4          # ours: round(mask_ratio * patches) masked per image (BEiT-like 40%)
    text_guided_ratio: float = 0.5   # ours: fraction of the masked patches drawn by text relevance, rest uniform
    relevance: Literal["cls", "words"] = "cls"   # ours: the caption CLS's cross-attention, or the words' mean
    global_feature: Literal["vision", "fusion"] = "vision"   # ours: the ViT's CLS (projected) or the fusion's
    predictor: Literal["head", "mlp"] = "head"   # ours: patches go to the shared head directly, or through an MLP

    def validate(self) -> None:
        for key in ("weight", "agree_weight", "mim_weight"):
            check_weight(f"objectives.semmim.{key}", getattr(self, key))
        for key in ("num_prototypes", "proj_dim", "proj_hidden", "sinkhorn_iters"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"objectives.semmim.{key} must be an int >= 1, got {v!r}")
        for key in ("student_temp", "teacher_temp"):
            if not getattr(self, key) > 0:
                raise ValueError(f"objectives.semmim.{key} must be > 0, got {getattr(self, key)}")
        if self.teacher_temp_start is not None and not self.teacher_temp_start > 0:
            raise ValueError(f"objectives.semmim.teacher_temp_start must be null or > 0, got {self.teacher_temp_start}")
        if self.teacher_temp_warmup_steps < 0:
            raise ValueError("objectives.semmim.teacher_temp_warmup_steps must be >= 0, got "
                             f"{self.teacher_temp_warmup_steps}")
        if self.teacher_temp_warmup_steps and self.teacher_temp_start is None:
            raise ValueError("objectives.semmim.teacher_temp_warmup_steps needs objectives.semmim.teacher_temp_start")
        for key in ("center_momentum", "momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"objectives.semmim.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"objectives.semmim.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.text_guided_ratio <= 1:
            raise ValueError(f"objectives.semmim.text_guided_ratio must be in [0, 1], got {self.text_guided_ratio}")
        for key, allowed in (("relevance", ("cls", "words")), ("global_feature", ("vision", "fusion")),
                             ("predictor", ("head", "mlp")), ("centering", ("mean", "sinkhorn"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"objectives.semmim.{key}: expected one of {allowed}, got {getattr(self, key)!r}")


def num_masked(mask_ratio: float, num_patches: int) -> int:
    return max(1, min(num_patches, round(mask_ratio * num_patches)))


class PrototypeHead(nn.Module):
    """The encoding space: DINO's head with its last layer weight-normalised at norm 1. -> (..., K) float32 cosine
    logits (in [-1, 1]; the temperatures scale them)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, num_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)   # only the directions matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the prototypes are read inside this module's forward, so ZeRO-3 gathers them
        z = self.mlp(x.to(self.mlp[0].weight.dtype))
        return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T


class Centers(nn.Module):
    """The teacher centers c_g (global) and c_p (patch): float32 buffers saved with the model."""

    def __init__(self, k: int):
        super().__init__()
        self.register_buffer("global_", torch.zeros(k))
        self.register_buffer("patch", torch.zeros(k))

    def _apply(self, fn, recurse=True):
        # As FeatureQueue: follow device moves only; a bf16 center would round every EMA update away.
        before = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, old in before.items():
            if self._buffers[k].dtype != old.dtype:
                self._buffers[k] = old.to(device=self._buffers[k].device)
        return self

    @torch.no_grad()
    def update(self, name: str, batch_mean: torch.Tensor, momentum: float) -> None:
        c = getattr(self, name)
        c.mul_(momentum).add_(batch_mean.to(c), alpha=1 - momentum)


def sharpen(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Teacher probabilities softmax((logits - center) / temp) in float32."""
    return F.softmax((logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, temp: float, iters: int, gather) -> torch.Tensor:
    """Teacher probabilities by Sinkhorn-Knopp over the whole batch of every rank: starting from each row's
    softmax(logits / temp), alternately rescale so that every prototype receives an equal share (1/K) of the rows'
    mass and every row sums to 1 (ending on the rows). Equal use of the prototypes is then enforced per batch instead
    of through an EMA center that lags a fast-moving teacher. `gather` concatenates over ranks."""
    q = F.softmax(logits.float() / temp, dim=-1)
    total = lambda v: gather(v[None]).sum(0)   # noqa: E731  (sum over ranks)
    rows, k = total(q.new_tensor(float(q.shape[0]))), q.shape[-1]
    for _ in range(iters):
        q = q / (total(q.sum(0)) * k / rows).clamp(min=1e-30)   # every column sums to rows / K over all ranks
        q = q / q.sum(-1, keepdim=True)
    return q


def soft_ce(student_logits: torch.Tensor, target: torch.Tensor, temp: float) -> torch.Tensor:
    """mean over rows of -sum_k target_k log_softmax(student_logits / temp)_k, float32."""
    return -(target * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(-1).mean()


def tube(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, N) patch mask -> (B, F, N): the same positions in every frame."""
    return mask[:, None].expand(mask.shape[0], frames, mask.shape[1])


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum()


class Targets(NamedTuple):
    relevance: torch.Tensor       # (B, N) text -> patch attention
    global_logits: torch.Tensor   # (B, K) momentum head on the full view's global feature
    patch_logits: torch.Tensor    # (B, F, N, K) momentum head on the text-injected patch features


class SemMIM(Objective):
    name, Config = "semmim", SemmimConfig
    reads = (TextEncoding, MomentumEncoding, MomentumFusion)
    heads = ("itc",)   # the momentum pass copies the retrieval path, ITC head included
    families = ("coattention",)   # reads the fusion's image stream

    def __init__(self, cfg: SemmimConfig, env: BuildEnv):
        super().__init__(cfg, env)
        backbone = env.backbone
        if not backbone.cfg.vision.mask_token:
            raise ValueError(MASK_TOKEN_NEEDED)
        d = backbone.hidden_size
        self.num_masked = num_masked(cfg.mask_ratio, backbone.vision.num_patches)
        self.head = PrototypeHead(d, cfg.proj_hidden, cfg.proj_dim, cfg.num_prototypes)
        if cfg.predictor == "mlp":
            self.predictor = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.centers = Centers(cfg.num_prototypes)
        MomentumFusion.require(env, cfg.relevance, cfg.momentum)   # the teacher's fusion and the relevance
        env.momentum_copy(f"objectives.{self.name}.head", cfg.momentum)

    @classmethod
    def check_run(cls, cfg, run) -> None:
        if not run.model.vision.mask_token:
            raise ValueError(MASK_TOKEN_NEEDED)

    def teacher_temp_at(self, step: Optional[int]) -> float:
        c = self.cfg
        if c.teacher_temp_start is None or step is None or c.teacher_temp_warmup_steps == 0:
            return c.teacher_temp
        f = min(1.0, float(step) / c.teacher_temp_warmup_steps)
        return c.teacher_temp_start + f * (c.teacher_temp - c.teacher_temp_start)

    @torch.no_grad()
    def targets(self, ctx) -> Targets:
        """The momentum model on the full image and the caption (the shared MomentumFusion pass), then the momentum
        head (no gradient)."""
        mf = ctx.get(MomentumFusion)
        f = ctx.pixel_values.shape[1]
        glob = (mf.image if self.cfg.global_feature == "vision" else mf.fused)[:, :f].mean(1)   # frame CLS mean
        b, n = mf.relevance.shape
        head = ctx.model.momentum.copy_of(f"objectives.{self.name}.head")
        logits = head(torch.cat([glob, mf.fused[:, f:].flatten(0, 1)]))
        return Targets(mf.relevance, logits[:b], logits[b:].unflatten(0, (b, f, n)))

    def student(self, ctx, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) global and (B * F * |M|, K) masked-patch logits of the online model on the masked image."""
        model, f = ctx.model, ctx.pixel_values.shape[1]
        image = model.encode_image(ctx.pixel_values, token_mask=mask)   # the ViT's own mask token, tubes for video
        z = model.fuse(ctx.text, ctx.attention_mask, image, text_out="none").image
        glob = (image.tokens if self.cfg.global_feature == "vision" else z)[:, :f].mean(1)
        patches = z[:, f:].unflatten(1, (f, mask.shape[1]))[tube(mask, f)]
        if self.cfg.predictor == "mlp":
            patches = self.predictor(patches)
        b = glob.shape[0]
        logits = self.head(torch.cat([glob, patches.to(glob.dtype)]))   # one call of the shared head
        return logits[:b], logits[b:]

    def forward(self, ctx) -> ObjectiveOutput:
        c = self.cfg
        t = self.targets(ctx)
        mask = text_guided_mask(t.relevance, self.num_masked, c.text_guided_ratio)
        rows = tube(mask, t.patch_logits.shape[1])   # the masked patches of every frame
        self.last_mask = mask   # for inspection (tests); not state
        s_global, s_patch = self.student(ctx, mask)
        temp = self.teacher_temp_at(ctx.step)
        with torch.no_grad():
            if c.centering == "sinkhorn":   # over the rows the loss uses: the images, the masked patches
                q_global = sinkhorn(t.global_logits, temp, c.sinkhorn_iters, ctx.gather)
                q_patch = sinkhorn(t.patch_logits[rows], temp, c.sinkhorn_iters, ctx.gather)
            else:
                q_global = sharpen(t.global_logits, self.centers.global_, temp)
                q_patch = sharpen(t.patch_logits[rows], self.centers.patch, temp)   # (B F |M|, K)
        agree = soft_ce(s_global, q_global, c.student_temp)
        mim = soft_ce(s_patch, q_patch, c.student_temp)
        stats = self.stats(t, mask, q_patch, s_patch, agree, mim)
        if self.training:   # after the loss: the targets above used the old centers
            g = ctx.gather
            self.centers.update("global_", g(t.global_logits.float()).mean(0), c.center_momentum)
            self.centers.update("patch", g(t.patch_logits.float().mean((1, 2))).mean(0), c.center_momentum)
        return ObjectiveOutput({"semmim_agree": c.agree_weight * agree, "semmim_mim": c.mim_weight * mim}, stats)

    @torch.no_grad()
    def stats(self, t: Targets, mask, q, s_patch, agree, mim) -> dict[str, torch.Tensor]:
        # Collapse shows two ways: every patch on the same few prototypes (low usage entropy of the batch mean) or
        # every target uniform (high per-target entropy, CE -> log K); the guard needs both.
        h = entropy(q.mean(0))   # this rank's batch-mean masked-patch target distribution
        target_h = -(q * q.clamp(min=1e-12).log()).sum(-1).mean()
        s = F.softmax(s_patch.detach().float() / self.cfg.student_temp, dim=-1)
        rel = t.relevance.float()
        rel = rel / rel.sum(1, keepdim=True).clamp(min=1e-12) * rel.shape[1]   # 1 = uniform
        return {"semmim_agree_ce": agree.detach(), "semmim_mim_ce": mim.detach(),
                "semmim_prototype_entropy": h, "semmim_effective_prototypes": h.exp(),
                "semmim_target_entropy": target_h,
                "semmim_student_effective_prototypes": entropy(s.mean(0)).exp(),
                "semmim_center_norm_global": self.centers.global_.norm(),
                "semmim_center_norm_patch": self.centers.patch.norm(),
                "semmim_masked": mask.float().sum(1).mean(),
                "semmim_relevance_masked": rel[mask].mean(),
                "semmim_relevance_unmasked": (rel * ~mask).sum() / (~mask).sum().clamp(min=1)}
