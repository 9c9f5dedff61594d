"""Rank discovery, process-group init and a gather-with-gradient for the contrastive objectives.

Where RANK/WORLD_SIZE/LOCAL_RANK come from, first match wins:
  1. a launcher (`deepspeed`, torchrun, slurm/pretrain.sh) exported them;
  2. this process is an srun task (SLURM_STEP_ID set): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID;
     MASTER_ADDR = first node of the step (127.0.0.1 on one node), MASTER_PORT = 20000 + job id % 20000 (the same
     rule as slurm/common.sh, so every task agrees without talking);
  3. MPI (PMI_RANK/PMI_SIZE);
  4. single process: rank 0 of 1 on 127.0.0.1 and a free port. A plain `python` inside an sbatch script or a
     salloc shell lands here: SLURM_NTASKS there is the job's size, not this process's world.
DeepSpeed would otherwise try MPI discovery (needs mpi4py); it never reads SLURM variables itself.
"""
from __future__ import annotations

import os
import re
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


def _in_srun_task() -> bool:
    return "RANK" not in os.environ and os.environ.get("SLURM_STEP_ID") not in (None, "") \
        and os.environ.get("SLURM_PROCID") not in (None, "")


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: "gpu[007-010,12],cpu1" -> "gpu007", "r[1-2]-n[3-4]" -> "r1-n3"."""
    out, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            j = nodelist.find("]", i)
            if j < 0:
                raise ValueError(f"bad SLURM node list {nodelist!r}: unclosed '['")
            out.append(re.split(r"[,-]", nodelist[i + 1:j])[0])
            i = j + 1
        else:
            out.append(nodelist[i])
            i += 1
    if not out:
        raise ValueError(f"bad SLURM node list {nodelist!r}")
    return "".join(out)


def slurm_master_port(job_id) -> int:
    return 20000 + int(job_id) % 20000


def discover() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, source) from the environment, without changing it."""
    if _in_srun_task():
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
        values = (os.environ["SLURM_PROCID"], _first_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default="1"),
                  _first_env("SLURM_LOCALID", default="0"))
        source = "slurm"
    elif "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        values = (_first_env("RANK", default="0"), _first_env("WORLD_SIZE", default="1"),
                  _first_env("LOCAL_RANK", default="0"))
        source = "launcher"
    elif os.environ.get("PMI_RANK") not in (None, ""):
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")
        values = (os.environ["PMI_RANK"], _first_env("PMI_SIZE", default="1"),
                  _first_env("MPI_LOCALRANKID", default="0"))
        source = "mpi"
    else:
        return 0, 1, 0, "single"
    try:
        rank, world, local = (int(v) for v in values)
    except ValueError:
        raise ValueError("rank environment is not integer: " +
                         ", ".join(f"{n}={v!r}" for n, v in zip(names, values))) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError("inconsistent rank environment: " +
                         ", ".join(f"{n}={v!r}" for n, v in zip(names, values)))
    return rank, world, local, source


def setup_env() -> None:
    """Export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* (see the module docstring for the order)."""
    rank, world, local, source = discover()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    if "MASTER_ADDR" not in os.environ:
        nodes = int(_first_env("SLURM_STEP_NUM_NODES", "SLURM_NNODES", default="1"))
        nodelist = _first_env("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
        multi_node = source == "slurm" and world > 1 and nodes > 1 and nodelist
        os.environ["MASTER_ADDR"] = first_host(nodelist) if multi_node else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if world == 1:   # a lone process picks a free port so parallel single-process runs do not collide
            port = _free_port()
        elif source == "slurm" and os.environ.get("SLURM_JOB_ID"):
            port = slurm_master_port(os.environ["SLURM_JOB_ID"])
        else:
            port = 29500
        os.environ["MASTER_PORT"] = str(port)


def env_world_size() -> int:
    return discover()[1]


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
    """all_gather whose backward sums every rank's gradient for this rank's slice (one all_reduce).

    torch.distributed.nn.functional.all_gather gives bit-identical values and gradients (fp32 and bf16, 2 gloo ranks:
    tests/train/test_distributed_gather.py), but in torch 2.14 it is deprecated (FutureWarning), the replacement it
    names lives in the private torch.distributed._functional_collectives (whose autograd gather is in turn deprecated
    for another name), and on gloo its backward runs one scatter per rank instead of one all_reduce. So we keep
    these few lines."""

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
    """`gather(t)` = cat of `t` over ranks on dim 0, with gradient. Needs the same batch size on every rank.

    grad: "exact" (the gradient of the full-batch loss) or "official": losses over gathered features then get
    1/world_size of it (`loss_grad_scale`, applied by models.backbone.gathered_loss), as in the released SCL code."""

    def __init__(self, grad: str = "exact"):
        if grad not in ("exact", "official"):
            raise ValueError(f"train.gathered_grad: expected 'exact' or 'official', got {grad!r}")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.loss_grad_scale = 1.0 / self.world_size if grad == "official" else 1.0

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


def max_over_ranks(value, device=None) -> float:
    """The largest of `value` (a number or a one-element tensor) over all ranks: the agreement behind every
    "does any rank want to stop / skip / refuse" decision. One all-reduce of one number."""
    t = value.detach().float().reshape(1) if torch.is_tensor(value) else torch.tensor([float(value)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] (all_gather_object) when world_size > 1 and the group is up, else [obj]:
    evaluations that shard their items over ranks combine the per-rank results with it."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        parts: list = [None] * world_size
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def first_by_index(local: list, world_size: int, num_items: int, what: str) -> dict:
    """Every rank's (item index, prediction) pairs -> {index: prediction}; the first one for an index wins (a padding
    row repeats an item another rank owns); an index outside [0, num_items) is a ValueError naming `what`."""
    out: dict = {}
    for part in gather_objects(local, world_size):
        for i, p in part:
            if not 0 <= i < num_items:
                raise ValueError(f"{what}: batch index {i} is outside the {num_items} items")
            out.setdefault(i, p)
    return out

