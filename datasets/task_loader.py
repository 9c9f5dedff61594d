"""Loaders for fine-tuning tasks: annotation files + media on disk, epochs, exact resume, bad samples counted.

A task dataset (datasets/task_sets.py) is map-style: `len(ds)`, `ds.load(i, rng) -> sample dict` (raises BadSample
for a missing / broken image, an empty question, ...) and `ds.collate(samples) -> batch` (datasets/batch.py keys
plus the task's own).

Train (`TaskLoader`): epoch e visits a permutation of all samples drawn from (seed, e), the same on every rank;
rank r takes every R-th of it (equal counts: the tail that does not divide is left for the next epoch's shuffle),
cut into micro batches of fixed index lists. A bad sample is counted by reason and replaced by a random other
sample (every micro batch keeps its size: ITC gathers equal sizes from every rank), and the run stops with one line
once more than data.max_bad_fraction of the samples read were bad. A sample's random crop / flip is seeded by (seed, epoch, index),
so the order of DataLoader workers does not matter. The state is (epoch, next batch, counters): resume continues
with exactly the next batch without reading what came before.

Eval (`eval_batches`): every sample once in index order, each batch carrying `index` (positions into the dataset)
and `valid` (False for a bad sample's row or a padding row). With `shard=True` each rank gets every R-th sample,
padded so that every rank runs the same number of batches (ZeRO-3 needs every rank in every forward).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Iterator, Optional, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from .batch import INDEX, VALID
from .config import DataConfig
from .loader import (LOG_FIRST_BAD, BadSample, BadSampleTooMany, LoaderStateMismatch, SampleDecoder,
                     _ignore_stop_signals, _start_workers)
from .shard_media import SHARDS_PREFIX, ShardIndex
from .shards import TarError

log = logging.getLogger(__name__)

STATE_VERSION = 1
REPLACE_TRIES = 8   # a bad train sample is replaced by one of this many random others (each bad one counted)


class TaskDataset(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int, rng: Optional[random.Random]) -> dict: ...
    def collate(self, samples: list[dict]) -> dict: ...


class MediaReader:
    """A media file -> uint8 (F, 3, H, W) through the pretraining decoders (data.image_size, data.num_frames,
    crop, flip, RandAugment in training); BadSample("missing_image" / "bad_image" / "oversize_image" / ...).
    A path "shards:NAME" is read from `shard_index` (datasets/shard_media.py; a name it lacks is missing_<modality>,
    a shard broken at that sample bad_<modality>)."""

    def __init__(self, cfg: DataConfig, train: bool, shard_index: Optional[ShardIndex] = None):
        self.decoders = {m: SampleDecoder(cfg, m, train) for m in ("image", "video")}
        self.shard_index = shard_index

    def __call__(self, path: str, modality: str, rng: Optional[random.Random]) -> torch.Tensor:
        try:
            if path.startswith(SHARDS_PREFIX):
                if self.shard_index is None:
                    raise ValueError(f"{path!r}: a shards: media path needs the set's shard_index")
                data = self.shard_index.read(path[len(SHARDS_PREFIX):])
            else:
                with open(path, "rb") as f:
                    data = f.read()
        except (OSError, KeyError):
            raise BadSample(f"missing_{modality}") from None
        except TarError:
            raise BadSample(f"bad_{modality}") from None
        return self.decoders[modality].decode(data, rng)


def _sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(hash((seed, epoch, index)) & 0xFFFFFFFFFFFF)


class _Batches(Dataset):
    """Item j = the collated batch of index list j (loaded in a DataLoader worker); bad samples reported back."""

    def __init__(self, dataset, index_lists: list[list[int]], seed: Optional[int], epoch: int):
        self.dataset, self.index_lists, self.seed, self.epoch = dataset, index_lists, seed, epoch

    def __len__(self) -> int:
        return len(self.index_lists)

    def __getitem__(self, j: int) -> dict:
        samples, kept, bad = [], [], []
        for i in self.index_lists[j]:
            # train (seeded): a bad sample is replaced by a random other one (same (seed, epoch, index) draw on any
            # worker), so every micro batch has its full size: the cross-rank gathers need equal sizes
            tries = [i] if self.seed is None else [i] + random.Random(i * 7919 + self.epoch).sample(
                range(len(self.dataset)), min(REPLACE_TRIES, len(self.dataset)))
            for t in tries:
                rng = None if self.seed is None else _sample_rng(self.seed, self.epoch, t)
                try:
                    samples.append(self.dataset.load(t, rng))
                    kept.append(t)
                    break
                except BadSample as b:
                    bad.append((b.reason, t))
        batch = self.dataset.collate(samples) if samples else {}
        batch[INDEX] = torch.tensor(kept, dtype=torch.long)
        batch["__bad__"] = bad
        batch["__read__"] = len(kept) + len(bad)
        return batch


def _iterate(batches: _Batches, num_workers: int, start: int = 0) -> Iterator[dict]:
    """Batches start.. of `batches` in order, loaded by `num_workers` DataLoader workers (0: in process)."""
    if start:
        batches = _Batches(batches.dataset, batches.index_lists[start:], batches.seed, batches.epoch)
    if num_workers == 0 or len(batches) == 0:
        for j in range(len(batches)):
            yield batches[j]
        return
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=min(num_workers, len(batches)),
                        generator=torch.Generator().manual_seed(0), worker_init_fn=_ignore_stop_signals)
    it = _start_workers(lambda: iter(loader))
    try:
        yield from it
    finally:
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            stop()


class TaskLoader:
    """Infinite iterable of train micro batches over epochs, with state_dict() / load_state_dict() / stats()."""

    def __init__(self, dataset, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 name: str = "train"):
        self.dataset, self.cfg, self.B, self.rank, self.R, self.seed = dataset, cfg, batch_size, rank, world_size, seed
        self.name = name
        self.per_rank = len(dataset) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{name}: {len(dataset)} samples are fewer than one micro batch ({batch_size}) on each "
                             f"of {world_size} ranks")
        self.epoch, self.next_batch = 0, 0
        self.read, self.bad = 0, Counter()
        self.example: Optional[list] = None

    def index_lists(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g)[self.rank::self.R][: self.per_rank].tolist()
        return [order[b * self.B:(b + 1) * self.B] for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[dict]:
        while True:
            batches = _Batches(self.dataset, self.index_lists(self.epoch), self.seed, self.epoch)
            for batch in _iterate(batches, self.cfg.num_workers, self.next_batch):
                self.next_batch += 1
                self._count(batch.pop("__bad__"), batch.pop("__read__"))
                if len(batch[INDEX]):
                    yield batch
            self.epoch, self.next_batch = self.epoch + 1, 0

    def _count(self, bad: list, read: int) -> None:
        self.read += read
        for reason, i in bad:
            self.bad[reason] += 1
            self.example = self.example or [i, reason]
            n = sum(self.bad.values())
            if n <= LOG_FIRST_BAD:
                log.warning("%s: skipping bad sample %d: %s (%d bad so far: %s)", self.name, i, reason, n,
                            dict(self.bad))
        n = sum(self.bad.values())
        if self.read >= self.cfg.bad_check_min_samples and n > self.cfg.max_bad_fraction * self.read:
            top = ", ".join(f"{r} {c}" for r, c in self.bad.most_common(3))
            raise BadSampleTooMany(f"{self.name}: {n} of {self.read} samples read were bad ({n / self.read:.1%} > "
                                   f"data.max_bad_fraction {self.cfg.max_bad_fraction}); top reasons: {top}; e.g. "
                                   f"sample {self.example[0]} ({self.example[1]})")

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "size": len(self.dataset), "world_size": self.R, "rank": self.rank,
                "micro_batch_size": self.B, "seed": self.seed, "epoch": self.epoch, "next_batch": self.next_batch,
                "read": self.read, "bad": dict(self.bad), "example": self.example}

    def load_state_dict(self, state: dict) -> None:
        for key, name, now in (("size", f"{self.name} samples (the annotation files)", len(self.dataset)),
                               ("world_size", "world size (number of ranks)", self.R), ("rank", "rank", self.rank),
                               ("micro_batch_size", "train.micro_batch_size", self.B), ("seed", "train.seed", self.seed)):
            if state.get(key) != now:
                raise LoaderStateMismatch(f"{name}: the checkpoint's data position was saved with "
                                          f"{state.get(key)!r}, this run has {now!r}; exact resume needs the same "
                                          "(restore it, or start a new --output_dir)")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        self.read, self.bad, self.example = int(state["read"]), Counter(state["bad"]), state.get("example")

    def stats(self) -> dict:
        return {"batches": self.epoch * self.batches_per_epoch + self.next_batch, "samples_read": self.read,
                "bad_samples": sum(self.bad.values()), "bad_by_reason": dict(self.bad)}


def eval_batches(dataset, batch_size: int, *, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 shard: bool = False, skipped: Optional[Counter] = None) -> Iterator[dict]:
    """Every sample once (this rank's share when `shard`), in index order, as batches with INDEX and VALID.

    A bad sample's row is replaced by a copy of a good one with VALID False (so batch shapes stay uniform) and
    counted in `skipped`; with `shard`, ranks with fewer samples get padding rows so every rank runs the same
    number of batches. A batch with no good sample at all is still yielded (VALID all False) when sharded."""
    n = len(dataset)
    mine = list(range(rank, n, world_size)) if shard else list(range(n))
    per = -(-n // world_size) if shard else n
    rows = mine + [None] * (per - len(mine))
    lists = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
    real = _Batches(dataset, [[i for i in lst if i is not None] for lst in lists], None, 0)
    for lst, batch in zip(lists, _iterate(real, num_workers)):
        bad = batch.pop("__bad__")
        batch.pop("__read__")
        if skipped is not None:
            skipped.update(reason for reason, _ in bad)
        kept = batch[INDEX].tolist()
        if not kept:   # nothing loadable: stand in with sample 0 of the dataset (or skip when not sharded)
            if not shard:
                continue
            stand_in = next(iter(_iterate(_Batches(dataset, [[0]], None, 0), 0)))
            stand_in.pop("__bad__"), stand_in.pop("__read__")
            batch, kept = stand_in, []
            src = [0] * len(lst)
        else:
            pos = {i: k for k, i in enumerate(batch[INDEX].tolist())}
            src = [pos.get(i, 0) for i in lst]
        yield _pad(batch, src, [i in kept for i in lst], [i if i is not None else -1 for i in lst])


def _pad(batch: dict, src: list[int], valid: list[bool], index: list[int]) -> dict:
    """Rows of `batch` rearranged to `src` (repeats allowed) with VALID and INDEX set per row."""
    sel = torch.tensor(src, dtype=torch.long)
    out = {}
    for k, v in batch.items():
        if k == INDEX:
            continue
        if torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[sel]
        elif isinstance(v, list):
            out[k] = [v[s] for s in src]
        else:
            out[k] = v
    out[INDEX] = torch.tensor(index, dtype=torch.long)
    out[VALID] = torch.tensor(valid, dtype=torch.bool)
    return out
