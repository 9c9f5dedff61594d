"""Zero-shot image<->text retrieval on the held-out loader, using the model's ITC embeddings.

Every rank embeds the whole (small) eval set: under ZeRO-3 each forward needs all ranks anyway, and the result is
then identical everywhere. A caption that occurs several times in the eval set counts as correct for every image
it describes (and the chance level accounts for it), so duplicate captions do not make R@1 ill-defined.
"""
from __future__ import annotations

import math

import torch

from datasets.batch import ATTENTION_MASK, CAPTION, INPUT_IDS, PIXEL_VALUES, SOURCE


def recall_at_k(sim: torch.Tensor, correct: torch.Tensor, k: int) -> float:
    """sim (Q, N) scores, correct (Q, N) bool: share of queries with a correct item among the top k."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return correct.gather(1, top).any(dim=1).float().mean().item()


def chance_at_k(correct: torch.Tensor, k: int) -> float:
    """Expected recall@k of a random ranking: 1 - C(N - c, k) / C(N, k) averaged over queries (c correct items)."""
    n = correct.shape[1]
    k = min(k, n)
    vals = [1.0 - math.comb(n - c, k) / math.comb(n, k) for c in correct.sum(1).tolist()]
    return sum(vals) / len(vals)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, caption_ids: list) -> dict:
    sim = img.float() @ txt.float().t()
    ids = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(caption_ids))}[c] for c in caption_ids])
    correct = ids[:, None] == ids[None, :]
    return {"i2t_r1": recall_at_k(sim, correct, 1), "t2i_r1": recall_at_k(sim.t(), correct, 1),
            "i2t_r5": recall_at_k(sim, correct, 5), "t2i_r5": recall_at_k(sim.t(), correct, 5),
            "chance": chance_at_k(correct, 1), "chance_r5": chance_at_k(correct, 5),
            "num_samples": int(sim.shape[0])}


@torch.no_grad()
def zero_shot_retrieval(engine, loader, source_names: list[str] | None = None) -> dict:
    """Embed every eval sample with model.embed_image / embed_text and score retrieval both ways.

    Each eval source is its own retrieval pool (an image set and a video set are not ranked against each other):
    with one source the keys are flat (i2t_r1, ...); with several they are prefixed by the source's name
    (`coco_val/i2t_r1`, ...). Batches name their source in batch["source"] (index into source_names)."""
    model = engine.module
    pools: dict[int, tuple[list, list, list]] = {}
    for batch in loader:
        imgs, txts, caption_ids = pools.setdefault(int(batch.get(SOURCE, 0)), ([], [], []))
        b = engine.to_device(batch)
        imgs.append(model.embed_image(b[PIXEL_VALUES]).float().cpu())
        txts.append(model.embed_text(b[INPUT_IDS], b[ATTENTION_MASK]).float().cpu())
        if "caption" in batch:   # raw strings: truncation cannot merge two different captions
            caption_ids.extend(batch[CAPTION])
        else:
            for ids, mask in zip(batch[INPUT_IDS].tolist(), batch[ATTENTION_MASK].tolist()):
                caption_ids.append(tuple(i for i, m in zip(ids, mask) if m))
    results = {src: retrieval_metrics(torch.cat(i), torch.cat(t), c) for src, (i, t, c) in sorted(pools.items())}
    if len(results) <= 1:
        return next(iter(results.values()), {})
    names = source_names or []
    return {f"{names[src] if src < len(names) else f'eval{src}'}/{k}": v
            for src, metrics in results.items() for k, v in metrics.items()}
