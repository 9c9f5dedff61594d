"""Rank discovery, process-group init and a gather-with-gradient for the contrastive objectives.

The `deepspeed` launcher and torchrun export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. A plain
`python train/pretrain.py` has none of them, and DeepSpeed would then try MPI discovery (needs mpi4py), so
single-process defaults are filled in. SLURM's variables are mapped too, so `srun python ...` works later.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _first_env(*names, default=None):
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return os.environ[n]
    return default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from the launcher, SLURM, or single-process defaults."""
    rank = _first_env("RANK", "SLURM_PROCID", "PMI_RANK", default="0")
    world = _first_env("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", default="1")
    local = _first_env("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", default="0")
    os.environ.setdefault("RANK", rank)
    os.environ.setdefault("WORLD_SIZE", world)
    os.environ.setdefault("LOCAL_RANK", local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A lone process picks a free port so parallel single-process runs do not collide on 29500.
        os.environ["MASTER_PORT"] = str(_free_port()) if world == "1" else "29500"


def env_world_size() -> int:
    return int(_first_env("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", default="1"))


def env_rank() -> int:
    return int(_first_env("RANK", "SLURM_PROCID", "PMI_RANK", default="0"))


def skip_shm_op() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory allreduce op (~40 s of g++ per fresh machine) on CPU.

    gloo does the collectives instead. Patched through sys.modules: `import deepspeed.comm.torch as m` would bind
    the real `torch` package (attribute lookup wins over the submodule). DS_SKIP_SHM_OP=0 keeps the op.
    """
    if os.environ.get("DS_SKIP_SHM_OP", "1") != "1":
        return
    import deepspeed.comm.torch  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed() -> "DistInfo":
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU); safe to call twice."""
    setup_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    if on_cpu:
        skip_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu:
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, t.shape[0]
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss used our slice; summing their gradients gives the gradient of the sum of the ranks'
        # losses (DeepSpeed then averages parameter gradients over ranks, i.e. the mean loss).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class TorchGather:
    """`gather(t)` = cat of `t` over ranks on dim 0, with gradient. Needs the same batch size on every rank."""

    def __init__(self):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        if t.dtype in (torch.bfloat16, torch.float16) and dist.get_backend() == "gloo":
            # gloo's half-precision collectives are not dependable everywhere; round-trip through fp32.
            return _AllGatherWithGrad.apply(t.float()).to(t.dtype)
        return _AllGatherWithGrad.apply(t)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
