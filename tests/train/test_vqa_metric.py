"""VQAv2 evaluation (train/vqa_eval.py): the official accuracy on hand-computed cases, including when the official
script normalises answers; the EvalAI file; evaluate_vqa on a tiny VQA task model whose answer is forced through
the classifier's bias, with padding rows, a missing item and a second rank simulated."""
import json
import os

import pytest
import torch

from datasets.batch import to_device
from datasets.vqa import VqaItem
from train.vqa_eval import evaluate_vqa, vqa_accuracy, write_evalai

from conftest import tiny_model_config


def leave_one_out(pred: str, gts: list[str]) -> float:
    """The metric on strings compared as they are: for each human, min(1, matches among the others / 3)."""
    total = 0.0
    for left_out in range(len(gts)):
        others = gts[:left_out] + gts[left_out + 1:]
        total += min(1.0, others.count(pred) / 3)
    return total / len(gts)


@pytest.mark.parametrize("matches,expected", [
    (0, 0.0),
    (1, 0.3),    # 9 of the 10 leave-one-out sets hold the match: 9 * (1/3) / 10
    (2, 0.6),    # 8 sets hold both: 8 * (2/3); 2 sets hold one: 2 * (1/3) -> (16/3 + 2/3) / 10
    (3, 0.9),    # 7 sets hold all three: 7 * 1; 3 sets hold two: 3 * (2/3) -> (7 + 2) / 10
    (4, 1.0),    # every set holds at least 3
    (10, 1.0),
])
def test_accuracy_by_number_of_agreeing_humans(matches, expected):
    gts = ["cat"] * matches + [f"dog{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)
    assert leave_one_out("cat", gts) == pytest.approx(expected)


def test_answers_are_normalised_only_when_the_humans_disagree():
    # all ten humans wrote "2": the official script compares the (stripped) prediction as it is
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0         # whitespace is always cleaned
    # humans disagree: prediction and human answers are both normalised
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("Two", ["two", "2", "2", "3", "3", "3", "4", "4", "4", "4"]) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)   # "yes." -> "yes"
    assert vqa_accuracy("the dog", ["dog", "a dog", "cat"] + ["cow"] * 7) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_evalai_file(tmp_path):
    path = str(tmp_path / "sub" / "vqa_submit.json")
    write_evalai(path, [(3, "yes"), (1, "2")])
    with open(path) as f:
        assert json.load(f) == [{"question_id": 3, "answer": "yes"}, {"question_id": 1, "answer": "2"}]
    assert os.listdir(tmp_path / "sub") == ["vqa_submit.json"]
    for bad in ([("3", "yes")], [(3, 4)], [(True, "yes")]):
        with pytest.raises(ValueError):
            write_evalai(path, bad)


# ---------------------------------------------------------------------------------------------- evaluate_vqa
VOCAB = ["yes", "no", "2", "red"]
ITEMS = [VqaItem(100, "a.jpg", "Is it?", ["yes"] * 5 + ["no"] * 5),
         VqaItem(101, "b.jpg", "How many?", ["2"] * 2 + ["3"] * 8),
         VqaItem(102, "c.jpg", "Which color?", ["red"] * 10),
         VqaItem(103, "d.jpg", "Is it not?", ["no"] * 10),        # its only row is invalid: no prediction
         VqaItem(104, "e.jpg", "Unanswered?", [])]                # a test question: predicted, not scored


@pytest.fixture(scope="module")
def vqa_model():
    from models.tasks.base import TaskModel
    from models.tasks.vqa import VqaHead

    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg.heads = []
    return TaskModel(cfg, VqaHead(2 * cfg.fusion.hidden_size, len(VOCAB)))


@pytest.fixture(scope="module")
def tok():
    from models.text import TextConfig, load_tokenizer

    return load_tokenizer(TextConfig(tokenizer="minilm"))


def _batch(tok, index, valid):
    enc = tok([ITEMS[i].question for i in index], padding="max_length", max_length=12, return_tensors="pt")
    g = torch.Generator().manual_seed(sum(index))
    return {"pixel_values": torch.randint(0, 256, (len(index), 1, 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "index": torch.tensor(index), "valid": torch.tensor(valid)}


def _force(model, answer: str):
    with torch.no_grad():
        model.head.classifier[-1].bias.zero_()
        model.head.classifier[-1].bias[VOCAB.index(answer)] = 100.0


def _batches(tok):
    # rank 0's share: items 2, 0, 4 and a padding row (index 0, invalid); item 3 only as an invalid row
    return [_batch(tok, [2, 0], [True, True]), _batch(tok, [4, 0, 3], [True, False, False])]


def _to_device(b):
    return to_device(b, torch.device("cpu"), torch.float32)


def test_evaluate_vqa_scores_the_forced_answer(vqa_model, tok, tmp_path):
    model = vqa_model
    model.train()
    for answer in ("no", "2"):
        _force(model, answer)
        path = str(tmp_path / f"{answer}.json")
        # a second rank predicted item 1 (and item 2 again, which must not count twice)
        other_rank = [(1, answer), (2, answer)]
        out = evaluate_vqa(model, _batches(tok), _to_device, VOCAB, ITEMS, rank=0, world_size=1, result_path=path)
        scored = {0: leave_one_out(answer, ITEMS[0].answers), 2: leave_one_out(answer, ITEMS[2].answers)}
        # items with answers: 0, 1, 2, 3 -> 1 and 3 have no prediction on this single rank and count 0
        assert out["vqa_acc"] == pytest.approx(sum(scored.values()) / 4)
        assert (out["vqa_num_questions"], out["vqa_num_scored"], out["vqa_num_predicted"], out["vqa_missing"]) \
            == (5, 4, 3, 2)
        with open(path) as f:
            assert json.load(f) == [{"question_id": 100, "answer": answer}, {"question_id": 101, "answer": ""},
                                    {"question_id": 102, "answer": answer}, {"question_id": 103, "answer": ""},
                                    {"question_id": 104, "answer": answer}]
        assert model.training   # restored

        # two ranks (all_gather_object simulated): rank 1 does not write the file
        import torch.distributed as dist

        def fake_gather(parts, local):
            parts[0], parts[1] = local, other_rank
        mp = pytest.MonkeyPatch()
        mp.setattr(dist, "is_initialized", lambda: True)
        mp.setattr(dist, "all_gather_object", fake_gather)
        try:
            path1 = str(tmp_path / f"{answer}_rank1.json")
            out = evaluate_vqa(model, _batches(tok), _to_device, VOCAB, ITEMS, rank=1, world_size=2,
                               result_path=path1)
        finally:
            mp.undo()
        scored[1] = leave_one_out(answer, ITEMS[1].answers)
        assert out["vqa_acc"] == pytest.approx(sum(scored.values()) / 4)
        assert (out["vqa_num_questions"], out["vqa_num_scored"], out["vqa_num_predicted"], out["vqa_missing"]) \
            == (5, 4, 4, 1)
        assert not os.path.exists(path1)
    # the forced answers were really different: "no" scores item 0 at 1.0, "2" scores item 1 at 0.6
    assert leave_one_out("no", ITEMS[0].answers) == 1.0 and leave_one_out("2", ITEMS[1].answers) == pytest.approx(0.6)
