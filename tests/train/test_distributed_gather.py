"""The trainer's gather over 2 gloo ranks against one process that holds the whole batch: a contrastive (ITC-style)
loss and its parameter gradients, and the gather itself (forward values, input gradients under a different loss on
each rank, fp32 and bf16). torch.distributed.nn.functional.all_gather goes through the same checks beside it, the
reference our own autograd Function is measured against (train/distributed.py says why we keep ours).

The loss is written here rather than taken from models/objectives/itc.py so that this file tests the gather, not
an objective's constructor; it is ITC's computation (each rank scores its rows against all gathered columns,
labels offset by the rank)."""
import os

import torch
import torch.distributed as dist

import torch.nn.functional as F

from conftest import spawn_ranks
from train.distributed import TorchGather

B, DIM, WORLD = 3, 16, 2


def make_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, DIM, generator=g), torch.randn(WORLD * B, DIM, generator=g)


class Contrastive(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj, self.text_proj = torch.nn.Linear(DIM, 8), torch.nn.Linear(DIM, 8)

    def forward(self, images, texts, gather):
        zi, zt = F.normalize(self.image_proj(images), dim=-1), F.normalize(self.text_proj(texts), dim=-1)
        all_i, all_t = gather(zi), gather(zt)
        labels = torch.arange(zi.shape[0]) + gather.rank * zi.shape[0]
        return (F.cross_entropy(zi @ all_t.T / 0.07, labels) + F.cross_entropy(zt @ all_i.T / 0.07, labels)) / 2


def step(model, images, texts, gather):
    loss = model(images, texts, gather)
    loss.backward()
    return loss.detach()


class OneProcess:
    rank = 0

    def __call__(self, t):
        return t


class TorchNNGather:
    def __init__(self):
        self.rank = dist.get_rank()

    def __call__(self, t):
        import torch.distributed.nn.functional as DF
        return torch.cat(DF.all_gather(t), dim=0)


def rank_weights(rank):
    """Each rank's loss is sum(gathered * W_rank): a different function of the whole gathered batch per rank."""
    return torch.randn(WORLD * B, DIM, generator=torch.Generator().manual_seed(100 + rank))


def _torch_nn_available() -> bool:   # deprecated in torch 2.14; the comparison goes when it does
    import torch.distributed.nn.functional as DF
    return hasattr(DF, "all_gather")


GATHERS = {"ours": TorchGather, **({"torch_nn": TorchNNGather} if _torch_nn_available() else {})}


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    images, texts = make_inputs()
    mine = slice(rank * B, (rank + 1) * B)
    out = {}
    for name, make in GATHERS.items():
        model = Contrastive()
        loss = step(model, images[mine], texts[mine], make())
        dist.all_reduce(loss)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(grads)  # what data-parallel averaging does
        out[f"{name}/itc_loss"], out[f"{name}/itc_grads"] = loss / WORLD, grads / WORLD
        for dtype in (torch.float32, torch.bfloat16):
            x = images[mine].to(dtype).requires_grad_()
            y = make()(x)
            (y.float() * rank_weights(rank)).sum().backward()
            parts = [torch.empty_like(x.grad) for _ in range(WORLD)]
            dist.all_gather(parts, x.grad)
            out[f"{name}/{dtype}/forward"] = y.detach()   # every rank holds the same; rank 0 reports it
            out[f"{name}/{dtype}/input_grad"] = torch.cat(parts)
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "two_ranks.pt"))
    dist.destroy_process_group()


def test_two_rank_gather_matches_one_process(tmp_path):
    spawn_ranks(worker, WORLD, str(tmp_path))
    two = torch.load(tmp_path / "two_ranks.pt", weights_only=True)

    model = Contrastive()
    images, texts = make_inputs()
    loss = step(model, images, texts, OneProcess())
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    # the gather alone, in one process: the ranks' losses summed, d/dX sum_r sum(X * W_r) = sum_r W_r
    # (each rank's output gradient is W_r in the input's dtype; the sum of two is rounded once)
    want_grad = {dtype: sum(rank_weights(r).to(dtype).float() for r in range(WORLD)).to(dtype)
                 for dtype in (torch.float32, torch.bfloat16)}
    for name in GATHERS:
        torch.testing.assert_close(two[f"{name}/itc_loss"], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[f"{name}/itc_grads"], grads, rtol=1e-4, atol=1e-6)
        for dtype in (torch.float32, torch.bfloat16):
            assert two[f"{name}/{dtype}/forward"].dtype == dtype
            assert torch.equal(two[f"{name}/{dtype}/forward"], images.to(dtype)), (name, dtype)
            torch.testing.assert_close(two[f"{name}/{dtype}/input_grad"], want_grad[dtype], rtol=0, atol=0,
                                       msg=f"{name} {dtype}")
    for key in two:   # and the two implementations agree bit for bit
        if key.startswith("ours/") and "torch_nn" in GATHERS:
            assert torch.equal(two[key], two["torch_nn/" + key[len("ours/"):]]), key
