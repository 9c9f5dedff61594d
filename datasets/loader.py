"""Webdataset train / eval loaders with exact, decode-free resume.

How the train stream is laid out (per rank r of R, DataLoader worker w of W, global worker g = r*W + w):
  * epoch e of a source: the source's shard list is permuted with seed (seed, source, e) - the same on every
    rank - and worker g reads shards perm[g::R*W]; so ranks and workers never share a shard in an epoch.
  * the worker's raw samples (undecoded bytes) pass a reservoir shuffle seeded by (seed, r, w, source, e);
    the i-th sample out of it in epoch e has *position* i. Every worker cycles its own epochs forever.
  * the crop / frame choice of a sample is seeded by (seed, r, w, source, e, position), so it does not
    depend on what was decoded before it.
  * batches are made inside the worker (fixed size; a bad sample is skipped and counted), and each batch
    carries the worker's (epoch, position) after it. The DataLoader hands batches out in worker round-robin.

State = for each worker, (epoch, position) per source after the last batch the *consumer* received, plus
the number of batches consumed. Resume rebuilds each worker at its (epoch, position): the raw tar stream and
the shuffle are replayed and the first `position` samples dropped before any decode; the worker that the
uninterrupted loader would have asked next is made DataLoader worker 0 (the logical ids are rotated).
"""
from __future__ import annotations

import bisect
import copy
import logging
import os
import random
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, SourceConfig
from .shards import expand_shards, raw_samples, shuffled
from .text import clean_caption, tokenize
from .transforms import ClipTransform, ImageTransform
from .video import decode_clip

log = logging.getLogger(__name__)

STATE_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")
MAX_CONSECUTIVE_BAD = 1000  # a worker that meets this many bad samples in a row is reading garbage


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _modality(sources: list[SourceConfig], what: str) -> str:
    mods = {s.modality for s in sources}
    if len(mods) != 1:
        raise ValueError(f"data.{what} mixes modalities {sorted(mods)}; all sources of one run must share one "
                         "modality for now")
    return mods.pop()


class SampleDecoder:
    """raw sample dict (bytes) -> (pixel_values (F,3,H,W), caption). Raises BadSample, never other errors."""

    def __init__(self, cfg: DataConfig, modality: str, train: bool):
        self.modality, self.train, self.num_frames = modality, train, cfg.num_frames
        tf = ImageTransform if modality == "image" else ClipTransform
        self.tf = tf(cfg.image_size, cfg.crop_scale, cfg.hflip, cfg.normalize, train)

    def __call__(self, raw: dict, rng: random.Random | None) -> tuple[torch.Tensor, str]:
        txt = raw.get("txt")
        if txt is None:
            raise BadSample("missing_txt")
        try:
            caption = clean_caption(txt.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadSample("bad_txt") from None
        if not caption:
            raise BadSample("empty_caption")
        exts = IMAGE_EXTS if self.modality == "image" else VIDEO_EXTS
        data = next((raw[e] for e in exts if e in raw), None)
        if data is None:
            raise BadSample(f"missing_{self.modality}")
        try:  # decoders raise a zoo of types (OSError, SyntaxError, DECORDError, ...) on broken bytes
            if self.modality == "image":
                px = self.tf(data, rng)
            else:
                px = self.tf(decode_clip(data, self.num_frames, rng if self.train else None), rng)
        except Exception as exn:  # noqa: BLE001 - any decode failure makes the sample bad, not the run
            raise BadSample(f"bad_{self.modality}") from exn
        return px, caption


class _TrainStream(IterableDataset):
    """One rank's infinite batch stream; each DataLoader worker runs `_worker(logical_id)`."""

    def __init__(self, cfg: DataConfig, tokenizer, shard_lists: list[list[str]], weights: list[float],
                 modality: str, micro_batch_size: int, rank: int, world_size: int, seed: int):
        self.cfg, self.tokenizer, self.shard_lists = cfg, tokenizer, shard_lists
        self.cum_weights = [sum(weights[: i + 1]) for i in range(len(weights))]
        self.decoder = SampleDecoder(cfg, modality, train=True)
        self.B, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.W = max(1, cfg.num_workers)
        self.start: list = [None] * self.W  # per logical worker state to resume from (set by TrainLoader)
        self.rotation = 0  # DataLoader worker k runs logical worker (k + rotation) % W

    def __iter__(self):
        info = get_worker_info()
        phys = info.id if info is not None else 0
        return self._worker((phys + self.rotation) % self.W)

    def _source(self, si: int, w: int, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
        g, G = self.rank * self.W + w, self.world_size * self.W
        while True:
            urls = list(self.shard_lists[si])
            random.Random(f"shards-{self.seed}-{si}-{epoch}").shuffle(urls)  # same on every rank
            rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{w}-{si}-{epoch}")
            pos = 0
            for raw in shuffled(raw_samples(urls[g::G]), self.cfg.shuffle_buffer, rng):
                pos += 1
                if pos > skip:  # resume: consumed samples are dropped here, still undecoded
                    yield epoch, pos, raw
            if pos == 0:
                raise RuntimeError(f"rank {self.rank} worker {w}: shards {urls[g::G]} hold no samples")
            epoch, skip = epoch + 1, 0

    def _pick(self, w: int, draw: int) -> int:
        if len(self.cum_weights) == 1:
            return 0
        u = random.Random(f"mix-{self.seed}-{self.rank}-{w}-{draw}").random() * self.cum_weights[-1]
        return min(bisect.bisect_right(self.cum_weights, u), len(self.cum_weights) - 1)

    def _worker(self, w: int) -> Iterator[dict]:
        st = copy.deepcopy(self.start[w]) or {"sources": [[0, 0] for _ in self.shard_lists], "draws": 0, "bad": {}}
        positions, draws, bad = st["sources"], st["draws"], Counter(st["bad"])
        streams = [self._source(si, w, ep, pos) for si, (ep, pos) in enumerate(positions)]
        pix, caps, keys, bad_run = [], [], [], 0
        while True:
            si = self._pick(w, draws)
            epoch, pos, raw = next(streams[si])
            positions[si], draws = [epoch, pos], draws + 1
            rng = random.Random(f"aug-{self.seed}-{self.rank}-{w}-{si}-{epoch}-{pos}")
            try:
                px, cap = self.decoder(raw, rng)
            except BadSample as b:
                bad[b.reason] += 1
                bad_run += 1
                if sum(bad.values()) <= 5:
                    log.warning("skipping bad sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), b.reason)
                if bad_run >= MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(f"{bad_run} bad samples in a row (last {raw.get('__url__')}): {dict(bad)}")
                continue
            bad_run = 0
            pix.append(px)
            caps.append(cap)
            keys.append(raw["__key__"])
            if len(pix) == self.B:
                batch = {"pixel_values": torch.stack(pix), **tokenize(self.tokenizer, caps, self.cfg.max_text_len),
                         "__key__": keys,
                         "__state__": {"worker": w, "sources": copy.deepcopy(positions), "draws": draws,
                                       "bad": dict(bad)}}
                pix, caps, keys = [], [], []
                yield batch


class TrainLoader:
    """Infinite iterable of batches with `state_dict()` / `load_state_dict()` for exact resume.

    The state is per rank (each rank saves and loads its own). Call `load_state_dict` before `iter()`.
    A new `iter()` continues from the current state (it does not restart the data)."""

    def __init__(self, stream: _TrainStream, patterns: list[str]):
        self.stream = stream
        self.num_workers = stream.cfg.num_workers
        self._meta = {"version": STATE_VERSION, "rank": stream.rank, "world_size": stream.world_size,
                      "num_workers": self.num_workers, "micro_batch_size": stream.B, "seed": stream.seed,
                      "shards": [len(s) for s in stream.shard_lists], "patterns": list(patterns)}
        self._batches = 0
        self._workers: list = [None] * stream.W

    def __iter__(self) -> Iterator[dict]:
        self.stream.start = copy.deepcopy(self._workers)
        self.stream.rotation = self._batches % self.stream.W
        if self.num_workers == 0:
            it = iter(self.stream)
        else:
            # own generator: creating the iterator must not consume the global torch RNG (model init/dropout)
            it = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                 persistent_workers=False, generator=torch.Generator().manual_seed(self.stream.seed),
                                 in_order=True))
        for batch in it:
            st = batch.pop("__state__")
            self._workers[st["worker"]] = {k: st[k] for k in ("sources", "draws", "bad")}
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {**copy.deepcopy(self._meta), "batches": self._batches, "workers": copy.deepcopy(self._workers)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} != {STATE_VERSION}")
        for k, v in self._meta.items():
            if k != "patterns" and state.get(k) != v:
                raise ValueError(f"loader state was saved with {k}={state.get(k)!r} but this loader has {k}={v!r}; "
                                 "exact resume needs the same ranks, workers, batch size, seed and shards")
        if len(state["workers"]) != self.stream.W:
            raise ValueError("loader state has a different number of workers")
        self._batches = int(state["batches"])
        self._workers = copy.deepcopy(state["workers"])

    def stats(self) -> dict:
        """Batches consumed and bad samples skipped (by reason) on this rank, as of the last consumed batch."""
        bad = Counter()
        for w in self._workers:
            if w:
                bad.update(w["bad"])
        return {"batches": self._batches, "bad_samples": sum(bad.values()), "bad_by_reason": dict(bad)}


def build_train_loader(data_cfg: DataConfig, tokenizer, *, micro_batch_size: int, rank: int, world_size: int,
                       seed: int) -> TrainLoader:
    data_cfg.validate()
    if not data_cfg.train:
        raise ValueError("data.train lists no sources")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    modality = _modality(data_cfg.train, "train")
    # the fast tokenizer would otherwise warn (and disable itself) in forked workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    need = world_size * max(1, data_cfg.num_workers)
    shard_lists = []
    for src in data_cfg.train:
        urls = expand_shards(src.shards)
        if len(urls) < need:
            raise ValueError(f"shard pattern {src.shards!r} has {len(urls)} shards, fewer than world_size x "
                             f"max(1, num_workers) = {world_size} x {max(1, data_cfg.num_workers)} = {need}; "
                             "every DataLoader worker on every rank needs at least one shard")
        shard_lists.append(urls)
    stream = _TrainStream(data_cfg, tokenizer, shard_lists, [s.weight for s in data_cfg.train], modality,
                          micro_batch_size, rank, world_size, seed)
    return TrainLoader(stream, [s.shards for s in data_cfg.train])


class EvalLoader:
    """Finite, fixed order (sources in order, shards in pattern order, tar order), every sample once, the last
    partial batch kept. Single process, so identical on every rank. Adds `caption` (cleaned strings)."""

    def __init__(self, cfg: DataConfig, tokenizer, shard_lists: list[list[str]], modality: str, batch_size: int):
        self.cfg, self.tokenizer, self.shard_lists, self.batch_size = cfg, tokenizer, shard_lists, batch_size
        self.decoder = SampleDecoder(cfg, modality, train=False)
        self.bad: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        self.bad = Counter()
        pix, caps, keys = [], [], []
        for urls in self.shard_lists:
            for raw in raw_samples(urls):
                try:
                    px, cap = self.decoder(raw, None)
                except BadSample as b:
                    self.bad[b.reason] += 1
                    log.warning("eval: skipping bad sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"),
                                b.reason)
                    continue
                pix.append(px)
                caps.append(cap)
                keys.append(raw["__key__"])
                if len(pix) == self.batch_size:
                    yield self._batch(pix, caps, keys)
                    pix, caps, keys = [], [], []
        if pix:
            yield self._batch(pix, caps, keys)

    def _batch(self, pix, caps, keys) -> dict:
        return {"pixel_values": torch.stack(pix), **tokenize(self.tokenizer, caps, self.cfg.max_text_len),
                "__key__": keys, "caption": caps}


def build_eval_loader(data_cfg: DataConfig, tokenizer, *, batch_size: int) -> EvalLoader:
    data_cfg.validate()
    if not data_cfg.eval:
        raise ValueError("data.eval lists no sources")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    modality = _modality(data_cfg.eval, "eval")
    return EvalLoader(data_cfg, tokenizer, [expand_shards(s.shards) for s in data_cfg.eval], modality, batch_size)
