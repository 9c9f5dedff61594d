"""Accuracy of a classification task model (NLVR2, SNLI-VE) over sharded eval batches, and the task's eval hook.

`evaluate_classifier` predicts every item with `model.head.logits(model, batch)` (argmax) and scores it against
the items' labels. Each batch carries `index` / `valid` (datasets/task_loader.py eval_batches): padding and bad
samples' rows run through the model (every rank runs the same forwards, as ZeRO-3 needs) but are not counted;
predictions are combined across ranks with all_gather_object, so every rank returns the same numbers. An item left
without a prediction (its images could not be read) counts as wrong, as a missing prediction does in NLVR2's
eval/metrics.py.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Sequence

import torch

from train.distributed import first_by_index


@torch.no_grad()
def evaluate_classifier(model, batches: Iterable[dict], to_device: Callable[[dict], dict], labels: Sequence[int],
                        rank: int, world_size: int) -> dict:
    """{"acc": correct / len(labels), "num": len(labels), "predicted": items with a prediction, "missing": the
    rest}; acc is absent for an empty split."""
    was_training = model.training
    model.eval()
    local: list[tuple[int, int]] = []
    try:
        for batch in batches:
            preds = model.head.logits(model, to_device(batch)).argmax(-1).tolist()
            for i, ok, p in zip(batch["index"].tolist(), batch["valid"].tolist(), preds):
                if ok:
                    local.append((int(i), int(p)))
    finally:
        model.train(was_training)
    pred: dict[int, int] = first_by_index(local, world_size, len(labels), "evaluate_classifier")
    out = {"num": len(labels), "predicted": len(pred), "missing": len(labels) - len(pred)}
    if labels:
        out["acc"] = sum(1 for i, y in enumerate(labels) if pred.get(i) == y) / len(labels)
    return out


def split_evaluator(cfg, dist_info, splits: dict) -> Callable:
    """The eval hook of a classification task: every split in `splits` ({"eval": dataset, "test": dataset}, each
    with .labels()) evaluated at each evaluation; keys of "eval" as evaluate_classifier returns them ("acc", ...),
    those of another split prefixed with its name ("test_acc", ...), plus "<split>_skipped" (bad samples)."""
    from datasets.task_loader import eval_batches

    t = cfg.train

    def evaluate(engine) -> dict:
        out = {}
        for name, data in splits.items():
            skipped = Counter()
            batches = eval_batches(data, t.eval_batch_size, num_workers=cfg.data.num_workers, rank=dist_info.rank,
                                   world_size=dist_info.world_size, shard=True, skipped=skipped)
            res = evaluate_classifier(engine.module, batches, engine.to_device, data.labels(), dist_info.rank,
                                      dist_info.world_size)
            prefix = "" if name == "eval" else f"{name}_"
            out.update({f"{prefix}{k}": v for k, v in res.items()})
            out[f"{name}_skipped"] = sum(skipped.values())
        return out

    return evaluate
