"""ITA in a real 2-rank gloo run with the trainer's gather: every rank's queues receive the momentum features of
both ranks' batches, rank 0's rows first. The expected rows are computed here in one process: a freshly built model's
momentum copies equal its online weights, so the momentum features are the online retrieval embeddings (eval mode)."""
import os

import torch
import torch.distributed as dist

from conftest import spawn_ranks, tiny_model_config

B, WORLD, QUEUE = 3, 2, 12


def _model():
    from models.objectives.ita import ItaConfig
    from models.text import TextConfig, load_tokenizer
    from models.vlp import build_model

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    torch.manual_seed(0)
    return build_model(tiny_model_config(), {"ita": ItaConfig(queue_size=QUEUE)}, tok).eval(), tok


def _batch(tok, rank):
    g = torch.Generator().manual_seed(10 + rank)
    captions = [["a red circle", "a blue square", "two green triangles"],
                ["a small dog", "an orange car parked", "a cat"]][rank]
    enc = tok(captions, padding="max_length", max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(B, 1, 3, 32, 32, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


def worker(rank, port, out_dir):
    from train.distributed import TorchGather

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    model, tok = _model()
    model.set_gather(TorchGather())
    model(_batch(tok, rank))
    ita = model.objectives["ita"]
    torch.save({"image": ita.image_queue.features.clone(), "text": ita.text_queue.features.clone(),
                "ptr": int(ita.image_queue.ptr)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_enqueue_gathered_momentum_features_in_rank_order(tmp_path):
    spawn_ranks(worker, WORLD, str(tmp_path))

    model, tok = _model()
    initial = {"image": model.objectives["ita"].image_queue.features.clone(),
               "text": model.objectives["ita"].text_queue.features.clone()}
    with torch.no_grad():
        batches = [_batch(tok, r) for r in range(WORLD)]
        want = {"image": torch.cat([model.embed_image(b["pixel_values"]) for b in batches]),
                "text": torch.cat([model.embed_text(b["input_ids"], b["attention_mask"]) for b in batches])}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["ptr"] == WORLD * B
        for k in ("image", "text"):
            torch.testing.assert_close(got[k][:WORLD * B], want[k], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {k}")
            assert torch.equal(got[k][WORLD * B:], initial[k][WORLD * B:])   # the rest untouched
