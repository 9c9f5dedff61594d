"""VQAv2 evaluation: the official accuracy, the EvalAI submission file, and the eval loop over a VQA task model.

The accuracy is the official one (GT-Vision-Lab/VQA master, vqaEval.py, "Fixed processing answers bug", 2021):
  1. the prediction and every human answer: newlines / tabs -> spaces, stripped;
  2. only if the human answers (after step 1) are NOT all the same string, the prediction and every human answer go
     through processPunctuation and processDigitArticle (datasets/vqa.py); when all humans gave the same string,
     nothing more is done and the prediction must equal it exactly ("two" scores 0 against ten "2"s);
  3. for each human answer i: acc_i = min(1, #{j != i : answer_j == prediction} / 3); the score is the mean of acc_i.
(Releases before 2021 processed the prediction always, the human answers only with processPunctuation, and only
when they were not all equal. Our predictions are vocabulary strings, already normalised, so the two agree
whenever the human answers are normalised too, which VQAv2's are.)
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

from datasets.vqa import VqaItem, process_digit_article, process_punctuation
from train.distributed import first_by_index


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer against the human answers (see the module docstring)."""
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy: no human answers to score against")
    res = _clean(pred)
    gts = [_clean(g) for g in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        res = process_digit_article(process_punctuation(res))
    accs = [min(1.0, sum(1 for j, g in enumerate(gts) if j != i and g == res) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def write_evalai(path: str, predictions: Iterable[tuple[int, str]]) -> None:
    """The EvalAI submission file: a JSON list of {"question_id": int, "answer": str}, written atomically."""
    rows = []
    for qid, ans in predictions:
        if not (isinstance(qid, int) and not isinstance(qid, bool)) or not isinstance(ans, str):
            raise ValueError(f"write_evalai: a prediction is (int question_id, str answer), got {(qid, ans)!r}")
        rows.append({"question_id": qid, "answer": ans})
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_vqa(model, batches: Iterable[dict], to_device: Callable[[dict], dict], vocab: list[str],
                 items: Sequence[VqaItem], rank: int, world_size: int,
                 result_path: Optional[str] = None) -> dict:
    """Predict every item with `model.head.logits(model, batch)` (argmax -> vocab string) and score it.

    Each batch carries `index` (positions into `items`) and `valid` (False rows are padding / bad samples: their
    outputs are ignored, but the forward still runs so that every rank runs the same forwards). Predictions are
    combined across ranks (all_gather_object) when world_size > 1 and torch.distributed is initialised; every rank
    returns the same metrics:
      vqa_acc             mean official accuracy over the items with human answers (absent when none has any);
                          an item left without a prediction (all its rows invalid) counts 0
      vqa_num_questions   len(items); vqa_num_scored: those with human answers (what vqa_acc averages over)
      vqa_num_predicted   items that got a prediction; vqa_missing: items that did not
    With `result_path` rank 0 writes the EvalAI file, one row per item in item order ("" for a missing one)."""
    was_training = model.training
    model.eval()
    local: list[tuple[int, str]] = []
    try:
        for batch in batches:
            logits = model.head.logits(model, to_device(batch))
            if logits.shape[-1] != len(vocab):
                raise ValueError(f"evaluate_vqa: the model scores {logits.shape[-1]} answers, the vocabulary "
                                 f"has {len(vocab)}")
            preds = logits.argmax(-1).tolist()
            for i, ok, p in zip(batch["index"].tolist(), batch["valid"].tolist(), preds):
                if ok:
                    local.append((int(i), vocab[p]))
    finally:
        model.train(was_training)
    answer: dict[int, str] = first_by_index(local, world_size, len(items), "evaluate_vqa")
    scored = [vqa_accuracy(answer[i], it.answers) if i in answer else 0.0
              for i, it in enumerate(items) if it.answers]
    out = {"vqa_num_questions": len(items), "vqa_num_scored": len(scored), "vqa_num_predicted": len(answer),
           "vqa_missing": len(items) - len(answer)}
    if scored:
        out["vqa_acc"] = sum(scored) / len(scored)
    if result_path is not None and rank == 0:
        write_evalai(result_path, [(it.question_id, answer.get(i, "")) for i, it in enumerate(items)])
    return out
