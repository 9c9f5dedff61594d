"""ITC over 2 gloo ranks with the trainer's gather equals ITC on the whole batch in one process (loss and grads)."""
import os
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.objectives.base import LocalGather
from models.objectives.itc import ITC, ItcConfig
from train.distributed import TorchGather

B, DIM = 3, 16


def make_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, DIM, generator=g), torch.randn(2 * B, DIM, generator=g)


def make_itc():
    torch.manual_seed(0)
    return ITC(ItcConfig(embed_dim=8), DIM)


def step(itc, images, texts, gather):
    ctx = SimpleNamespace(image_global=images, text_global=texts, gather=gather, cache={})
    loss = itc(ctx).losses["itc"]
    loss.backward()
    return loss.detach()


def worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    images, texts = make_inputs()
    mine = slice(rank * B, (rank + 1) * B)
    itc = make_itc()
    loss = step(itc, images[mine], texts[mine], TorchGather())
    dist.all_reduce(loss)
    grads = torch.cat([p.grad.flatten() for p in itc.parameters()])
    dist.all_reduce(grads)  # what data-parallel averaging does
    if rank == 0:
        torch.save({"loss": loss / 2, "grads": grads / 2}, os.path.join(out_dir, "two_ranks.pt"))
    dist.destroy_process_group()


def test_two_rank_itc_matches_full_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "two_ranks.pt")

    itc = make_itc()
    images, texts = make_inputs()
    loss = step(itc, images, texts, LocalGather())
    grads = torch.cat([p.grad.flatten() for p in itc.parameters()])
    torch.testing.assert_close(two["loss"], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["grads"], grads, rtol=1e-4, atol=1e-6)

