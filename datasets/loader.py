"""Webdataset train / eval loaders: weighted image + video mixing, exact resume that seeks instead of replaying.

How the train stream is laid out (per rank r of R, DataLoader worker w of W, global worker g = r*W + w):
  * shards: epoch e of source s permutes the source's shards with seed (seed, s, e) - the same on every rank -
    and worker g reads perm[g::R*W], so ranks and workers never share a shard in an epoch (fewer shards than
    R*W is an error). With `data.resampled` worker g instead reads, as its k-th shard, one drawn with
    replacement by an rng seeded by (seed, s, g, k): an endless stream, any shard count.
  * each (worker, source) passes its raw samples (undecoded bytes) through a reservoir shuffle of
    `data.shuffle_buffer` samples driven by an rng seeded by (seed, r, w, s, e); the i-th sample out of it in
    epoch e has *position* i.
  * the crop / flip / RandAugment / frame choice of a sample is seeded by (seed, r, w, s, e, position), so it
    does not depend on what was decoded before it.
  * batches are made inside the worker (fixed size; a bad sample is skipped, counted, and replaced). The
    DataLoader hands batches out in worker round-robin, so logical worker w's j-th batch is this rank's
    global batch n = j*W + w.
  * mixing: a batch is single-modality. The modality of global batch n is drawn by an rng seeded by
    (seed, n) - identical on every rank, so all ranks run the same frame count in a step (the model gathers
    features across ranks) - with probability proportional to the summed weights of that modality's sources.
    Inside the batch each sample's source is drawn by weight among that modality's sources (rng seeded by
    (seed, r, n)). Image batches are (B, 1, 3, H, W), video batches (B, data.num_frames, 3, H, W); every batch
    carries "modality" ("image" | "video").

Resume: after every batch the worker reports its state: per source the epoch, the shard cursor, the byte
offset of the next unread sample in that shard, the shuffle buffer as (shard, byte offset) references in buffer
order, and the shuffle rng state; plus its batch count and bad-sample counters. `state_dict()` holds that for
the last batch the *consumer* received. Resume seeks every source to its offset and re-reads the buffered
samples by offset, so its cost is one shuffle buffer per source, whatever the position in the epoch. `pipe:`
URLs cannot seek: there the command is re-run and read through up to the offset. The worker that the
uninterrupted loader would have asked next becomes DataLoader worker 0 (logical ids are rotated).
"""
from __future__ import annotations

import atexit
import bisect
import copy
import gc
import logging
import os
import random
import signal
import weakref
from collections import Counter, defaultdict
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import batch as K
from .config import MODALITIES, DataConfig, SourceConfig
from .shards import TarError, expand_shards, iter_samples, read_samples_at
from .text import clean_caption, tokenize
from .transforms import ClipTransform, ImageTransform, TooLarge
from .video import decode_clip

log = logging.getLogger(__name__)

# (input_ids, attention_mask, generator=...) -> (masked ids, labels); see build_train_loader
TextMasker = Callable[..., tuple[torch.Tensor, torch.Tensor]]

STATE_VERSION = 3  # 3 added "shard_names"; a version 2 state still loads (its shard names go unchecked)
READABLE_VERSIONS = (2, 3)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")
MAX_CONSECUTIVE_BAD = 1000  # a worker that meets this many bad samples in a row is reading garbage
LOG_FIRST_BAD = 10  # bad samples logged one by one per worker; after that one line per LOG_BAD_EVERY
LOG_BAD_EVERY = 1000
KEEP_WORST_SHARDS = 20  # per worker, bounds the state size


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DataAbort(RuntimeError):
    """The data cannot be trained on (too many bad samples, shards with no readable sample). str() is one line
    that says why, with an example shard and key; the train entry point prints it and exits 2. Raised in the
    consumer process with no chained traceback: a DataLoader worker hands the message over as a record instead
    of letting the exception travel through the DataLoader."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line whatever a shard or key name holds


class BadSampleTooMany(DataAbort):
    pass


class LoaderStateMismatch(ValueError):
    """The checkpoint's loader state was saved under a different data layout (batch size, workers, shuffle
    buffer, seed, ranks, shards): exact resume is impossible. str() is one line naming the config key."""


_META_KEYS = {  # loader state meta key -> how a user knows it
    "rank": "rank", "world_size": "world size (number of ranks)", "num_workers": "data.num_workers",
    "micro_batch_size": "train.micro_batch_size", "seed": "train.seed", "resampled": "data.resampled",
    "shuffle_buffer": "data.shuffle_buffer",
}


def _mismatch(key: str, saved, now, what: str = "value") -> LoaderStateMismatch:
    return LoaderStateMismatch(f"{key}: the checkpoint's data position was saved with {saved!r}, this run has "
                               f"{now!r}; exact resume needs the same {what} (restore it, or start a new "
                               "--output_dir)")


def shard_name(url: str) -> str:
    """The file name of a shard, so a data set moved to another directory (or read through `pipe:`) still
    resumes: /data/cc3m/00001.tar -> 00001.tar; pipe:aws s3 cp s3://b/cc3m/00001.tar - -> 00001.tar."""
    if url.startswith("pipe:"):
        words = url[len("pipe:"):].split()
        url = next((w for w in reversed(words) if ".tar" in w), words[-1] if words else url)
    return os.path.basename(url.rstrip("/"))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM / SIGUSR1 / SIGINT sent to the whole process group (scancel, Ctrl-C,
    SLURM's --signal) must reach only the trainer, which finishes the step and saves; a worker killed by it
    would crash the DataLoader first. The workers start with these signals blocked (`_start_workers`), so one
    that arrives before this runs waits, and is then discarded. Module level: it pickles under spawn too."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_workers(make):
    """make() (which starts DataLoader worker processes) with the stop signals blocked in this thread, so the
    workers inherit the blocked mask and no signal can kill one between its start and `_ignore_stop_signals`;
    the caller's mask is restored after (a signal that came meanwhile is delivered then). Cyclic garbage is
    collected first: a forked worker inherits it, and freeing there an object that owns threads of this process
    (PyAV's swscale context does) waits for ever for threads the child does not have."""
    gc.collect()
    if not hasattr(signal, "pthread_sigmask"):
        return make()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return make()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_LIVE_WORKER_ITERS: "weakref.WeakSet" = weakref.WeakSet()  # train DataLoader iterators with workers
_WORKER_PROCS: "weakref.WeakSet" = weakref.WeakSet()  # their worker processes (multiprocessing keeps them until reaped)


def _stop_live_workers() -> None:
    """atexit, before multiprocessing's own exit hook (registered earlier, so run later): that hook stops daemon
    children with SIGTERM, which our workers ignore, and then joins them without a timeout, so a process exiting
    with a train DataLoader iterator still referenced (a traceback, a reference cycle), or with a worker the
    DataLoader failed to stop (its fallback is SIGTERM too), would hang there for ever. Shut live iterators down
    the DataLoader's way (that also unregisters their pids from its SIGCHLD check), then SIGKILL any worker
    still running."""
    for it in list(_LIVE_WORKER_ITERS):
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for w in list(_WORKER_PROCS):
        try:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_stop_live_workers)


def media_modality(raw: dict) -> str | None:
    """Which modality a raw sample holds, judged by its member extensions (None: neither)."""
    if any(e in raw for e in IMAGE_EXTS):
        return "image"
    if any(e in raw for e in VIDEO_EXTS):
        return "video"
    return None


class SampleDecoder:
    """raw sample dict (bytes) -> (pixel_values (F,3,H,W), caption). Raises BadSample, never other errors.
    tokenizer_view=True (the pretraining train stream, image decoders, data.tokenizer_view set): ->
    (pixel_values, caption, tokenizer_pixels (3, s, s)), both views cut from one decode."""

    def __init__(self, cfg: DataConfig, modality: str, train: bool, tokenizer_view: bool = False):
        self.modality, self.train, self.num_frames = modality, train, cfg.num_frames
        self.max_pixels = cfg.max_image_pixels
        if tokenizer_view and not (train and modality == "image" and cfg.tokenizer_view is not None):
            raise ValueError("a tokenizer view needs a train image decoder and data.tokenizer_view set")
        self.views = tokenizer_view
        if modality == "image":
            self.tf = ImageTransform(cfg.image_size, cfg.crop_scale, cfg.hflip, cfg.normalize, train,
                                     cfg.randaugment, max_pixels=cfg.max_image_pixels,
                                     tokenizer_view=cfg.tokenizer_view if tokenizer_view else None)
        else:
            self.tf = ClipTransform(cfg.image_size, cfg.crop_scale, cfg.hflip, cfg.normalize, train, cfg.randaugment)

    def __call__(self, raw: dict, rng: random.Random | None) -> tuple:
        exts = IMAGE_EXTS if self.modality == "image" else VIDEO_EXTS
        data = next((raw[e] for e in exts if e in raw), None)
        if data is None:
            raise BadSample(f"missing_{self.modality}")
        txt = raw.get("txt")
        if txt is None:
            raise BadSample("missing_txt")
        try:
            caption = clean_caption(txt.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadSample("non_utf8_caption") from None
        if not caption:
            raise BadSample("empty_caption")
        if self.views:
            pixels, tokenizer_pixels = self.decode(data, rng)
            return pixels, caption, tokenizer_pixels
        return self.decode(data, rng), caption

    def decode(self, data: bytes, rng: random.Random | None):
        """Encoded image / video bytes -> uint8 (F, 3, H, W) (with tokenizer_view: and the uint8 (3, s, s)
        tokenizer view); BadSample on anything undecodable or oversize."""
        try:  # decoders raise a zoo of types (OSError, SyntaxError, DECORDError, ...) on broken bytes
            if self.modality == "image":
                return self.tf(data, rng)
            return self.tf(decode_clip(data, self.num_frames, rng if self.train else None, self.max_pixels), rng)
        except TooLarge:  # more pixels than data.max_image_pixels: refused before decoding
            raise BadSample(f"oversize_{self.modality}") from None
        except Exception as exn:  # noqa: BLE001 - any decode failure makes the sample bad, not the run
            raise BadSample(f"bad_{self.modality}") from exn


class _BadLog:
    """One worker's bad-sample bookkeeping: counts by reason and by shard, rate-limited log, abort threshold."""

    def __init__(self, cfg: DataConfig, where: str, state: dict | None = None):
        state = state or {}
        self.cfg, self.where = cfg, where
        self.read = int(state.get("read", 0))
        self.reasons = Counter(state.get("bad", {}))
        self.shards = Counter(state.get("bad_shards", {}))
        self.example = state.get("example")
        self.run = 0

    def good(self) -> None:
        self.read += 1
        self.run = 0
        self.check()

    def bad(self, reason: str, url: str, key: str) -> None:
        self.read += 1
        self.run += 1
        self.reasons[reason] += 1
        self.shards[url] += 1
        self.example = self.example or [url, key, reason]
        total = sum(self.reasons.values())
        if total <= LOG_FIRST_BAD or total % LOG_BAD_EVERY == 0:
            log.warning("%s: skipping bad sample %s in %s: %s (%d bad so far: %s)", self.where, key, url, reason,
                        total, dict(self.reasons))
        if self.run >= MAX_CONSECUTIVE_BAD:
            raise BadSampleTooMany(f"{self.where}: {self.run} bad samples in a row (last {key} in {url}: {reason}); "
                                   f"bad by reason {dict(self.reasons)}")
        self.check()

    def check(self) -> None:
        bad = sum(self.reasons.values())
        if self.read >= self.cfg.bad_check_min_samples and bad > self.cfg.max_bad_fraction * self.read:
            top = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common(3))
            url, key, reason = self.example
            raise BadSampleTooMany(
                f"{self.where}: {bad} of {self.read} samples read were bad ({bad / self.read:.1%} > "
                f"data.max_bad_fraction {self.cfg.max_bad_fraction}); top reasons: {top}; e.g. key {key!r} in "
                f"{url} ({reason}). Fix or drop the shards (python datasets/inspect_shards.py lists them) or raise "
                "data.max_bad_fraction")

    def state(self) -> dict:
        return {"read": self.read, "bad": dict(self.reasons),
                "bad_shards": dict(self.shards.most_common(KEEP_WORST_SHARDS)), "example": self.example}


def _rng_state(rng: random.Random) -> list:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _set_rng_state(rng: random.Random, st: list) -> None:
    rng.setstate((st[0], tuple(st[1]), st[2]))  # tuples: the state may have gone through JSON


class _Source:
    """One train source as read by one logical worker: shard order, byte cursor and shuffle buffer, all of
    it restorable from `state()` without reading consumed data."""

    def __init__(self, urls: list[str], si: int, rank: int, w: int, g: int, G: int, seed: int, bufsize: int,
                 resampled: bool, badlog: _BadLog, state: dict | None):
        self.urls, self.si, self.rank, self.w, self.g, self.G = urls, si, rank, w, g, G
        self.seed, self.bufsize, self.resampled, self.badlog = seed, max(1, bufsize), resampled, badlog
        self.rng = random.Random()
        self._it = None  # open shard reader
        self._pending_refs = None
        if state is None:
            self._start_epoch(0)
        else:
            self.epoch, self.k, self.offset = state["epoch"], state["k"], state["offset"]
            self.pos, self.exhausted = state["pos"], state["exhausted"]
            self.order = self._order(self.epoch)
            _set_rng_state(self.rng, state["rng"])
            self.buf = []
            self._pending_refs = [tuple(r) for r in state["buf"]]  # re-read on first use, by offset

    def _order(self, epoch: int) -> list[int]:
        if self.resampled:
            return []
        perm = list(range(len(self.urls)))
        random.Random(f"shards-{self.seed}-{self.si}-{epoch}").shuffle(perm)  # same on every rank
        return perm[self.g::self.G]

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.k, self.offset, self.pos, self.exhausted, self.buf = epoch, 0, 0, 0, False, []
        self.order = self._order(epoch)
        self.rng.seed(f"shuffle-{self.seed}-{self.rank}-{self.w}-{self.si}-{epoch}")

    def _shard(self, k: int) -> int | None:
        if self.resampled:
            return random.Random(f"resample-{self.seed}-{self.si}-{self.g}-{k}").randrange(len(self.urls))
        return self.order[k] if k < len(self.order) else None

    def _refill_buffer(self) -> None:
        by_shard = defaultdict(list)
        for shard, off in self._pending_refs:
            by_shard[shard].append(off)
        got = {shard: read_samples_at(self.urls[shard], offs, shard) for shard, offs in by_shard.items()}
        self.buf = [got[shard][off] for shard, off in self._pending_refs]
        self._pending_refs = None

    def _read_one(self) -> dict | None:
        """Next raw sample in shard order, None when this epoch's shards are used up."""
        empty_run = 0
        while True:
            if self._it is None:
                shard = self._shard(self.k)
                if shard is None:
                    self.exhausted = True
                    return None
                if empty_run > 10 * len(self.urls) + 100:  # resampled mode never runs out: avoid a silent hang
                    raise DataAbort(f"{self.badlog.where}: {empty_run} shards in a row of data.train[{self.si}] "
                                    f"held no readable samples, e.g. {self.urls[shard]}; bad by reason "
                                    f"{dict(self.badlog.reasons)}")
                self._it = iter_samples(self.urls[shard], self.offset, shard)
                empty_run += 1
            try:
                raw, self.offset = next(self._it)
                return raw
            except StopIteration:
                pass
            except TarError as e:  # the rest of the shard is unreadable: skip it, count it once
                self.badlog.bad(e.reason, e.url, f"@byte{e.offset}")
            self._it.close()
            self._it, self.k, self.offset = None, self.k + 1, 0

    def _emit(self, raw: dict) -> tuple[int, int, dict]:
        self.pos += 1
        return self.epoch, self.pos, raw

    def next(self) -> tuple[int, int, dict]:
        """(epoch, position, raw sample): a reservoir shuffle whose every step is checkpointable."""
        if self._pending_refs is not None:
            self._refill_buffer()
        while True:
            raw = None if self.exhausted else self._read_one()
            if raw is not None:
                if self.bufsize <= 1:
                    return self._emit(raw)
                if len(self.buf) < self.bufsize:
                    self.buf.append(raw)
                    continue
                k = self.rng.randrange(self.bufsize)
                self.buf[k], raw = raw, self.buf[k]
                return self._emit(raw)
            if self.buf:  # epoch input done: drain the buffer in random order
                return self._emit(self.buf.pop(self.rng.randrange(len(self.buf))))
            if self.pos == 0:
                raise DataAbort(f"{self.badlog.where}: its {len(self.order)} shard(s) of data.train[{self.si}] "
                                f"hold no readable samples, e.g. {self.urls[self.order[0]]}; bad by reason "
                                f"{dict(self.badlog.reasons)}. Fix or drop the shards (python "
                                "datasets/inspect_shards.py lists them)")
            self._start_epoch(self.epoch + 1)

    def state(self) -> dict:
        refs = self._pending_refs if self._pending_refs is not None else \
            [(r["__shard__"], r["__offset__"]) for r in self.buf]
        return {"epoch": self.epoch, "k": self.k, "offset": self.offset, "pos": self.pos,
                "exhausted": self.exhausted, "buf": [list(r) for r in refs], "rng": _rng_state(self.rng)}


def _cumulative(weights: list[float]) -> list[float]:
    out, t = [], 0.0
    for w in weights:
        t += w
        out.append(t)
    return out


def _draw(cum: list[float], rng: random.Random) -> int:
    return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


class _TrainStream(IterableDataset):
    """One rank's infinite batch stream; each DataLoader worker runs `_worker(logical_id)`."""

    def __init__(self, cfg: DataConfig, tokenizer, shard_lists: list[list[str]], sources: list[SourceConfig],
                 micro_batch_size: int, rank: int, world_size: int, seed: int, text_masker: Optional[TextMasker]):
        self.cfg, self.tokenizer, self.shard_lists, self.text_masker = cfg, tokenizer, shard_lists, text_masker
        self.B, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.W = max(1, cfg.num_workers)
        self.by_modality = {m: [i for i, s in enumerate(sources) if s.modality == m] for m in MODALITIES}
        self.by_modality = {m: idx for m, idx in self.by_modality.items() if idx}
        self.mod_names = list(self.by_modality)
        self.mod_cum = _cumulative([sum(sources[i].weight for i in idx) for idx in self.by_modality.values()])
        self.src_cum = {m: _cumulative([sources[i].weight for i in idx]) for m, idx in self.by_modality.items()}
        # with data.tokenizer_view every train source is an image source (DataConfig.validate)
        views = cfg.tokenizer_view is not None
        self.decoders = {m: SampleDecoder(cfg, m, train=True, tokenizer_view=views) for m in self.by_modality}
        self.start: list = [None] * self.W  # per logical worker state to resume from (set by TrainLoader)
        self.rotation = 0  # DataLoader worker k runs logical worker (k + rotation) % W

    def __iter__(self):
        info = get_worker_info()
        phys = info.id if info is not None else 0
        return self._worker((phys + self.rotation) % self.W)

    def batch_modality(self, n: int) -> str:
        """Modality of this rank's global batch n: a function of (seed, n) only, so the same on every rank."""
        if len(self.mod_names) == 1:
            return self.mod_names[0]
        return self.mod_names[_draw(self.mod_cum, random.Random(f"modality-{self.seed}-{n}"))]

    def _worker(self, w: int) -> Iterator[dict]:
        """Batches of logical worker w. Unusable data (DataAbort) ends the stream with one {"__abort__": message}
        record: raised here, the exception would reach the trainer wrapped in the DataLoader's worker traceback."""
        try:
            yield from self._batches(w)
        except DataAbort as e:
            yield {"__abort__": str(e)}

    def _batches(self, w: int) -> Iterator[dict]:
        st = copy.deepcopy(self.start[w]) or {"sources": [None] * len(self.shard_lists), "batches": 0}
        g, G = self.rank * self.W + w, self.world_size * self.W
        badlog = _BadLog(self.cfg, f"train rank {self.rank} worker {w}", st)
        sources = [_Source(urls, si, self.rank, w, g, G, self.seed, self.cfg.shuffle_buffer, self.cfg.resampled,
                           badlog, st["sources"][si]) for si, urls in enumerate(self.shard_lists)]
        j = st["batches"]
        while True:
            n = j * self.W + w
            modality = self.batch_modality(n)
            idx, cum, decoder = self.by_modality[modality], self.src_cum[modality], self.decoders[modality]
            mix = random.Random(f"mix-{self.seed}-{self.rank}-{n}")
            pix, caps, keys, toks = [], [], [], []
            while len(pix) < self.B:
                si = idx[_draw(cum, mix)] if len(idx) > 1 else idx[0]
                epoch, pos, raw = sources[si].next()
                rng = random.Random(f"aug-{self.seed}-{self.rank}-{w}-{si}-{epoch}-{pos}")
                try:
                    px, cap, *tok = decoder(raw, rng)  # tok: [tokenizer view] with data.tokenizer_view
                except BadSample as b:
                    badlog.bad(b.reason, raw["__url__"], raw["__key__"])
                    continue
                badlog.good()
                pix.append(px)
                caps.append(cap)
                toks += tok
                keys.append(raw["__key__"])
            j += 1
            batch = {K.PIXEL_VALUES: torch.stack(pix), K.NORMALIZE: self.cfg.normalize,
                     **tokenize(self.tokenizer, caps, self.cfg.max_text_len), K.SAMPLE_KEYS: keys, K.MODALITY: modality}
            if toks:
                batch[K.TOKENIZER_PIXELS] = torch.stack(toks)
            if self.text_masker is not None:
                gen = torch.Generator().manual_seed(random.Random(f"mlm-{self.seed}-{self.rank}-{n}").getrandbits(63))
                batch[K.MLM_INPUT_IDS], batch[K.MLM_LABELS] = self.text_masker(
                    batch[K.INPUT_IDS], batch[K.ATTENTION_MASK], generator=gen)
            batch["__state__"] = {"worker": w, "batches": j, "sources": [s.state() for s in sources],
                                  **badlog.state()}
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
                      "shards": [len(s) for s in stream.shard_lists], "resampled": stream.cfg.resampled,
                      "shuffle_buffer": stream.cfg.shuffle_buffer, "patterns": list(patterns),
                      "shard_names": [[shard_name(u) for u in s] for s in stream.shard_lists]}
        self._batches = 0
        self._workers: list = [None] * stream.W

    def __iter__(self) -> Iterator[dict]:
        self.stream.start = copy.deepcopy(self._workers)
        self.stream.rotation = self._batches % self.stream.W
        if self.num_workers == 0:
            it = iter(self.stream)
        else:
            # own generator: creating the iterator must not consume the global torch RNG (model init/dropout)
            loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                                generator=torch.Generator().manual_seed(self.stream.seed), in_order=True,
                                worker_init_fn=_ignore_stop_signals)
            it = _start_workers(lambda: iter(loader))
            _LIVE_WORKER_ITERS.add(it)
            _WORKER_PROCS.update(getattr(it, "_workers", []))
        message = None
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                if "__abort__" in batch:  # a worker met unusable data: one clean line, not a worker traceback
                    message = batch["__abort__"]
                    break
                st = batch.pop("__state__")
                self._workers[st.pop("worker")] = st
                self._batches += 1
                yield batch
        finally:
            # stop the workers now (abort, error, or the consumer letting go), not whenever the iterator object goes:
            # an exception's traceback can keep it alive, and one collected by gc cannot stop its workers gracefully
            # (the DataLoader's fallback is SIGTERM, which our workers ignore)
            stop = getattr(it, "_shutdown_workers", None)
            if stop is not None:
                stop()
        if message is not None:
            raise DataAbort(message) from None

    def state_dict(self) -> dict:
        return {**copy.deepcopy(self._meta), "batches": self._batches, "workers": copy.deepcopy(self._workers)}

    def load_state_dict(self, state: dict) -> None:
        """Raises LoaderStateMismatch (a ValueError, one line naming the config key) when the state was saved
        under another data layout."""
        v = state.get("version")
        if v not in READABLE_VERSIONS:
            raise LoaderStateMismatch(f"data loader state: the checkpoint's data position has format version {v!r}, "
                                      f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}; exact "
                                      "resume is not possible from it (start a new --output_dir)")
        for k, name in _META_KEYS.items():
            if state.get(k) != self._meta[k]:
                raise _mismatch(name, state.get(k), self._meta[k])
        saved, now = state.get("shards"), self._meta["shards"]
        if not isinstance(saved, list) or len(saved) != len(now):
            raise _mismatch("data.train (number of sources)", len(saved) if isinstance(saved, list) else saved,
                            len(now))
        for i, (a, b) in enumerate(zip(saved, now)):
            if a != b:
                raise _mismatch(f"data.train[{i}].shards (shard count)", a, b)
        for i, (a, b) in enumerate(zip(state.get("shard_names") or [None] * len(now), self._meta["shard_names"])):
            if a is not None and a != b:
                j = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                raise LoaderStateMismatch(
                    f"data.train[{i}].shards: the checkpoint's data position was saved with shard {j} = {a[j]!r}, "
                    f"this run has {b[j]!r} there; exact resume needs the same shard list in the same order "
                    "(restore it, or start a new --output_dir)")
        if len(state.get("workers") or []) != self.stream.W:
            raise _mismatch("data.num_workers (worker states)", len(state.get("workers") or []), self.stream.W)
        self._batches = int(state["batches"])
        self._workers = copy.deepcopy(state["workers"])

    def stats(self) -> dict:
        """As of the last consumed batch on this rank: batches, samples read, bad samples by reason and the
        shards with the most bad samples."""
        bad, shards, read = Counter(), Counter(), 0
        for w in self._workers:
            if w:
                bad.update(w["bad"])
                shards.update(w["bad_shards"])
                read += w["read"]
        return {"batches": self._batches, "samples_read": read, "bad_samples": sum(bad.values()),
                "bad_by_reason": dict(bad), "worst_shards": shards.most_common(5)}


def _expand(src: SourceConfig, where: str) -> list[str]:
    try:
        return expand_shards(src.shards)
    except (FileNotFoundError, ValueError) as e:  # ValueError: braceexpand's unbalanced braces
        raise ValueError(f"{where}.shards: {e}") from None


def _train_shard_lists(cfg: DataConfig, world_size: int) -> list[list[str]]:
    if not cfg.train:
        raise ValueError("data.train: lists no sources; a run needs at least one train source")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
    per_rank = max(1, cfg.num_workers)
    need = world_size * per_rank
    shard_lists = []
    for i, src in enumerate(cfg.train):
        urls = _expand(src, f"data.train[{i}]")
        if len(urls) < need and not cfg.resampled:
            raise ValueError(f"data.train[{i}].shards: {src.shards!r} has {len(urls)} shards, fewer than world_size x "
                             f"max(1, data.num_workers) = {world_size} x {per_rank} = {need}; every DataLoader "
                             "worker on every rank needs its own shard (add shards, lower data.num_workers, or set "
                             "data.resampled: true)")
        shard_lists.append(urls)
    return shard_lists


def _eval_shard_lists(cfg: DataConfig) -> list[list[str]]:
    return [_expand(src, f"data.eval[{i}]") for i, src in enumerate(cfg.eval)]


def check_sources(cfg: DataConfig, world_size: int) -> None:
    """Fail fast, before a model is built, on a data config no run can use: ValueError with one line naming
    the key - no train source, a train or eval shard pattern that matches no file or has missing files, fewer
    train shards than world_size x max(1, data.num_workers) (unless data.resampled). Also validates `cfg`."""
    cfg.validate()
    _train_shard_lists(cfg, world_size)
    _eval_shard_lists(cfg)


def build_train_loader(data_cfg: DataConfig, tokenizer, *, micro_batch_size: int, rank: int, world_size: int,
                       seed: int, text_masker: Optional[TextMasker] = None) -> TrainLoader:
    """`text_masker(input_ids, attention_mask, generator=g) -> (masked ids, labels)`: MLM masking in the workers,
    needed when data.mlm_probability is set (train/ builds it from models.masking.bert_mask; this package knows no
    model). Each batch then also carries mlm_input_ids / mlm_labels; g is seeded by (seed, rank, batch number)."""
    data_cfg.validate()
    if data_cfg.mlm_probability is not None and text_masker is None:
        raise ValueError("data.mlm_probability is set but build_train_loader got no text_masker to apply it")
    if text_masker is not None and data_cfg.mlm_probability is None:
        raise ValueError("build_train_loader got a text_masker but data.mlm_probability is not set")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    shard_lists = _train_shard_lists(data_cfg, world_size)
    # the fast tokenizer would otherwise warn (and disable itself) in forked workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stream = _TrainStream(data_cfg, tokenizer, shard_lists, list(data_cfg.train), micro_batch_size, rank,
                          world_size, seed, text_masker)
    return TrainLoader(stream, [s.shards for s in data_cfg.train])


class EvalLoader:
    """Finite, fixed order (sources in order, shards in pattern order, tar order), every sample once, the last
    partial batch of each source kept. A batch never mixes sources: it carries "source" (index into data.eval)
    and "modality". Single process, so identical on every rank. Adds `caption` (cleaned strings)."""

    def __init__(self, cfg: DataConfig, tokenizer, shard_lists: list[list[str]], modalities: list[str],
                 batch_size: int):
        self.cfg, self.tokenizer, self.shard_lists, self.batch_size = cfg, tokenizer, shard_lists, batch_size
        self.modalities = modalities
        self.decoders = {m: SampleDecoder(cfg, m, train=False) for m in set(modalities)}
        self.bad: Counter = Counter()  # bad samples by reason in the last pass
        self.bad_shards: Counter = Counter()  # ... and by shard url

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._iter()
        except DataAbort as e:  # raised while handling a bad sample: drop that chained context
            raise DataAbort(str(e)) from None

    def _iter(self) -> Iterator[dict]:
        self.bad, self.bad_shards = Counter(), Counter()
        badlog = _BadLog(self.cfg, "eval")
        for si, (urls, modality) in enumerate(zip(self.shard_lists, self.modalities)):
            pix, caps, keys = [], [], []
            for shard, url in enumerate(urls):
                try:
                    for raw, _ in iter_samples(url, 0, shard):
                        try:
                            px, cap = self.decoders[modality](raw, None)
                        except BadSample as b:
                            self.bad[b.reason] += 1
                            self.bad_shards[url] += 1
                            badlog.bad(b.reason, url, raw["__key__"])
                            continue
                        badlog.good()
                        pix.append(px)
                        caps.append(cap)
                        keys.append(raw["__key__"])
                        if len(pix) == self.batch_size:
                            yield self._batch(pix, caps, keys, si, modality)
                            pix, caps, keys = [], [], []
                except TarError as e:
                    self.bad[e.reason] += 1
                    self.bad_shards[url] += 1
                    badlog.bad(e.reason, url, f"@byte{e.offset}")
            if pix:
                yield self._batch(pix, caps, keys, si, modality)

    def _batch(self, pix, caps, keys, si, modality) -> dict:
        return {K.PIXEL_VALUES: torch.stack(pix), K.NORMALIZE: self.cfg.normalize,
                **tokenize(self.tokenizer, caps, self.cfg.max_text_len),
                K.SAMPLE_KEYS: keys, K.CAPTION: caps, K.SOURCE: si, K.MODALITY: modality}


def build_eval_loader(data_cfg: DataConfig, tokenizer, *, batch_size: int) -> EvalLoader:
    data_cfg.validate()
    if not data_cfg.eval:
        raise ValueError("data.eval: lists no sources")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return EvalLoader(data_cfg, tokenizer, _eval_shard_lists(data_cfg), [s.modality for s in data_cfg.eval],
                      batch_size)
