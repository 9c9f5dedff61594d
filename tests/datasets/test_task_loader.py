"""The fine-tuning loaders (datasets/task_loader.py): epochs, rank split, exact resume, bad samples, eval padding."""
import random

import pytest
import torch

from datasets.config import DataConfig
from datasets.loader import BadSample, BadSampleTooMany, LoaderStateMismatch
from datasets.task_loader import TaskLoader, eval_batches


class Toy:
    """Sample i is the number i (plus a random draw, to see the per-sample seeding); `bad` indices raise."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def load(self, i, rng):
        if i in self.bad:
            raise BadSample("broken")
        return {"x": i, "r": rng.random() if rng is not None else -1.0}

    def collate(self, samples):
        return {"x": torch.tensor([s["x"] for s in samples]), "r": torch.tensor([s["r"] for s in samples])}


def take(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def cfg(**kw):
    return DataConfig(num_workers=kw.pop("num_workers", 0), **kw)


def test_each_epoch_visits_every_sample_once_split_over_ranks():
    n, world, b = 23, 2, 3   # 11 per rank -> 3 batches of 3; 2 samples per rank per epoch wait for a later shuffle
    loaders = [TaskLoader(Toy(n), cfg(), batch_size=b, rank=r, world_size=world, seed=5) for r in range(world)]
    assert loaders[0].batches_per_epoch == 3
    for epoch in range(2):
        seen = []
        for ld in loaders:
            got = take(ld, 3) if epoch == 0 else take(ld, 6)[3:]
            seen += [x for batch in got for x in batch["x"].tolist()]
        assert len(seen) == len(set(seen)) == 18                    # no sample twice within an epoch
    e0 = [x for ld in [TaskLoader(Toy(n), cfg(), batch_size=b, rank=0, world_size=1, seed=5)]
          for batch in take(ld, 7) for x in batch["x"].tolist()]
    assert e0[:21] != sorted(e0[:21])                                # shuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batches(workers):
    data = Toy(20)
    full = take(TaskLoader(data, cfg(num_workers=workers), batch_size=4, rank=0, world_size=1, seed=1), 13)
    first = TaskLoader(data, cfg(num_workers=workers), batch_size=4, rank=0, world_size=1, seed=1)
    take(first, 7)   # into the second epoch (5 batches per epoch)
    state = first.state_dict()
    again = TaskLoader(data, cfg(num_workers=workers), batch_size=4, rank=0, world_size=1, seed=1)
    again.load_state_dict(state)
    rest = take(again, 6)
    for a, b in zip(full[7:], rest):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["r"], b["r"])   # same samples, same random draws


def test_a_changed_layout_is_refused_on_resume():
    state = TaskLoader(Toy(20), cfg(), batch_size=4, rank=0, world_size=1, seed=1).state_dict()
    other = TaskLoader(Toy(21), cfg(), batch_size=4, rank=0, world_size=1, seed=1)
    with pytest.raises(LoaderStateMismatch, match="the annotation files"):
        other.load_state_dict(state)
    with pytest.raises(LoaderStateMismatch, match="train.micro_batch_size"):
        TaskLoader(Toy(20), cfg(), batch_size=5, rank=0, world_size=1, seed=1).load_state_dict(state)


def test_bad_samples_are_replaced_counted_and_batches_keep_their_size():
    bad = {1, 4, 9}
    ld = TaskLoader(Toy(12, bad), cfg(), batch_size=4, rank=0, world_size=1, seed=3)
    batches = take(ld, 9)   # 3 epochs
    assert all(len(b["x"]) == 4 for b in batches)
    assert not bad & {x for b in batches for x in b["x"].tolist()}
    stats = ld.stats()
    assert stats["bad_samples"] == stats["bad_by_reason"]["broken"] >= 9     # each of 3 bad x 3 epochs, at least
    assert stats["samples_read"] == 9 * 4 + stats["bad_samples"]


def test_too_many_bad_samples_stop_the_run_with_one_line():
    ld = TaskLoader(Toy(10, bad=range(8)), cfg(max_bad_fraction=0.2, bad_check_min_samples=5), batch_size=2, rank=0,
                    world_size=1, seed=0)
    with pytest.raises(BadSampleTooMany) as e:
        take(ld, 10)
    assert "\n" not in str(e.value) and "data.max_bad_fraction" in str(e.value) and "broken" in str(e.value)


def test_eval_batches_cover_every_sample_once_and_ranks_run_equally_many_batches():
    data = Toy(11, bad={3})
    per_rank = []
    for r in range(3):
        got = list(eval_batches(data, 1, rank=r, world_size=3, shard=True))   # 4, 4 and 3 samples
        per_rank.append(got)
        for b in got:
            assert len(b["x"]) == len(b["index"]) == len(b["valid"])
    assert len({len(g) for g in per_rank}) == 1                      # same number of batches on every rank
    valid = sorted(i for g in per_rank for b in g for i, v in zip(b["index"].tolist(), b["valid"].tolist()) if v)
    assert valid == [i for i in range(11) if i != 3]
    for g in per_rank:   # a valid row holds its own sample
        for b in g:
            for x, i, v in zip(b["x"].tolist(), b["index"].tolist(), b["valid"].tolist()):
                assert not v or x == i
    skipped = __import__("collections").Counter()
    whole = list(eval_batches(data, 4, skipped=skipped))
    assert [i for b in whole for i, v in zip(b["index"].tolist(), b["valid"].tolist()) if v] == valid
    assert skipped == {"broken": 1}


def test_too_small_a_dataset_is_one_line():
    with pytest.raises(ValueError, match="fewer than one micro batch"):
        TaskLoader(Toy(3), cfg(), batch_size=2, rank=0, world_size=2, seed=0)
    random.seed(0)
