"""The released SCL code's cross-rank semantics in a real 2-rank gloo run, against an independent re-enactment of it
written here: `train.gathered_grad: official` (AllGather_multi: backward keeps the local slice, DDP then averages)
and MGSC's `text_negatives: local` (the text term on this rank's batch)."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import spawn_ranks, tiny_model_config

B, WORLD = 3, 2


def _model(objectives, parameterization="raw"):
    from models.text import TextConfig, load_tokenizer
    from models.vlp import build_model

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    cfg = tiny_model_config(vision_depth=1, text_layers=1, parameterization=parameterization)
    torch.manual_seed(0)
    return build_model(cfg, objectives, tok).eval(), tok


def _batch(tok, rank):
    g = torch.Generator().manual_seed(10 + rank)
    captions = [["a red circle on the left", "a blue square", "two green triangles in a row"],
                ["a small dog", "an orange car parked by a tree", "a cat"]][rank]
    enc = tok(captions, padding="max_length", max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(B, 1, 3, 32, 32, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


class _SliceGather(torch.autograd.Function):
    """The released AllGather_multi, re-enacted: cat over ranks; backward returns this rank's slice only."""

    @staticmethod
    def forward(ctx, t):
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        ctx.rank, ctx.b = dist.get_rank(), t.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def _mean_grads(model):
    """Gradients averaged over ranks, as DDP / DeepSpeed apply them."""
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            out[n] = g / dist.get_world_size()
    return out


def worker(rank, port, out_dir):
    from models.objectives.glscl import MgscConfig
    from models.objectives.itc import ItcConfig
    from train.distributed import TorchGather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = {}
    for mode in ("official", "exact"):
        model, tok = _model({"itc": ItcConfig()})
        model.set_gather(TorchGather(mode))
        out = model(_batch(tok, rank))
        out["loss"].backward()
        result[mode] = _mean_grads(model)
    # the released ITC: every rank computes the full loss over the gathered batch (NormSoftmaxLoss x con_weight 0.5)
    model, tok = _model({"itc": ItcConfig()})
    batch = _batch(tok, rank)
    image = model.encode_image(batch["pixel_values"])
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    zi, zt, tau = model.itc(image.tokens[:, :1].mean(1), text[:, 0])
    all_i, all_t = _SliceGather.apply(zi), _SliceGather.apply(zt)
    sim = all_i @ all_t.T / tau
    labels = torch.arange(sim.shape[0])
    (0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))).backward()
    result["released"] = _mean_grads(model)

    # MGSC with local text negatives: the same masks as a one-process run on this rank's batch alone
    for negatives in ("local", "global"):
        model, tok = _model({"mgsc": MgscConfig(text_negatives=negatives)})
        model.set_gather(TorchGather())
        torch.manual_seed(100 + rank)
        out = model(_batch(tok, rank))
        result[f"mgsc_{negatives}"] = {k: float(v) for k, v in out["stats"].items() if k.startswith("mgsc_")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_official_gathered_grad_and_local_text_negatives_match_the_released_semantics(tmp_path):
    spawn_ranks(worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    official, exact, released = ranks[0]["official"], ranks[0]["exact"], ranks[0]["released"]
    assert official.keys() == released.keys() and "itc.temperature" in official
    for name in released:
        torch.testing.assert_close(official[name], released[name], rtol=1e-4, atol=1e-5, msg=name)
    # and it is not the exact gradient: the feature path gets 1/world_size of it, the temperature all of it
    torch.testing.assert_close(official["itc.image_proj.0.weight"], exact["itc.image_proj.0.weight"] / WORLD,
                               rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(official["itc.temperature"], exact["itc.temperature"], rtol=1e-4, atol=1e-8)

    from models.backbone import LocalGather
    from models.objectives.glscl import MgscConfig

    for rank in range(WORLD):
        model, tok = _model({"mgsc": MgscConfig(text_negatives="local")})
        model.set_gather(LocalGather())
        torch.manual_seed(100 + rank)
        alone = model(_batch(tok, rank))["stats"]
        got = ranks[rank]["mgsc_local"]
        assert abs(got["mgsc_text"] - float(alone["mgsc_text"])) < 1e-5   # the text term saw this rank only
        assert abs(got["mgsc_image"] - float(alone["mgsc_image"])) > 1e-3   # the image term saw both ranks
        assert abs(ranks[rank]["mgsc_global"]["mgsc_text"] - float(alone["mgsc_text"])) > 1e-3
