"""Reading checkpoints as untrusted input: weights_only loads (DeepSpeed's included), validation, fallback.

Every file a resume reads goes through `safe_load`: torch's weights_only unpickler plus a short allowlist of the
plain-data classes DeepSpeed pickles into its optimizer states (a loss scaler object, an enum, a dataclass).
Nothing else is constructed, so a `__reduce__` payload in any checkpoint file is refused before it can run.

A checkpoint tag is usable when `COMPLETE` is present (rank 0 writes it after every rank has finished writing)
and every file this rank will read opens with `safe_load(mmap=True)` (which reads the pickle and the zip
directory, not the tensor data: a truncated file fails here). `find_resume_tag` starts from `latest` and falls
back to the newest usable tag, saying what was wrong with each one it passed over.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional

import torch

COMPLETE = "complete.json"
_TAG = re.compile(r"step_(\d+)")
_RANKED = re.compile(r"(?:zero_pp_rank_|train_state_rank)(\d+)")


class CheckpointError(Exception):
    """A checkpoint file that must not or cannot be read; the message is one line naming the file."""


class UnsafeCheckpoint(CheckpointError):
    """A file holding objects that weights_only refuses: possibly code. Never a reason to fall back quietly."""


OK, BROKEN, UNSAFE = 0, 1, 2   # check_tag's verdicts, ordered so that the max over ranks is the verdict


def _safe_globals() -> list:
    """DeepSpeed's plain-data classes found in its optimizer-state files (ZeRO 1-3, fp32/bf16/fp16)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:   # an older/newer DeepSpeed that lacks one: whatever it pickles is refused, safely
        pass
    return out


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True (+ DeepSpeed's plain-data classes). Raises CheckpointError, one line."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:   # noqa: BLE001 - unpickling errors come in many types; all mean "do not use this"
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "weights_only" in msg:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            what = f" (it names {found.group(1)})" if found else ""
            raise UnsafeCheckpoint(f"{path}: refused: holds objects other than tensors and plain data{what}; it "
                                  "may carry code, so it is never unpickled") from None
        first = msg.strip().splitlines()[0][:200] if msg.strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt?): {first}") from None


def install_safe_checkpoint_engine(ds_engine) -> None:
    """Make DeepSpeed read its own checkpoint files with `safe_load` (its default engine uses weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(ds_engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(ds_engine.checkpoint_engine).__name__}: "
                           "only the torch engine is wrapped with weights_only loading")

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    old = ds_engine.checkpoint_engine
    new = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    new.__dict__.update(old.__dict__)
    ds_engine.checkpoint_engine = new


def list_tags(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, name) of the step_N directories, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
            if (m := _TAG.fullmatch(name)) and os.path.isdir(os.path.join(ckpt_dir, name))]
    return sorted(tags, reverse=True)


def files_for_rank(tag_dir: str, rank: int) -> list[str]:
    """The files of a tag this rank reads on resume: its own ranked files and the unranked (shared) ones."""
    out = []
    for name in sorted(os.listdir(tag_dir)):
        if not name.endswith(".pt"):
            continue
        m = _RANKED.search(name)
        if m is None or int(m.group(1)) == rank:
            out.append(os.path.join(tag_dir, name))
    return out


def check_tag(ckpt_dir: str, tag: str, rank: int, world_size: int) -> tuple[int, str]:
    """(OK, "") when `tag` is usable by `rank`, else (BROKEN or UNSAFE, one line saying why)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not tag or not _TAG.fullmatch(tag):
        return BROKEN, f"{tag!r} is not a checkpoint name"
    if not os.path.isdir(tag_dir):
        return BROKEN, f"{tag_dir}: no such checkpoint directory"
    marker = os.path.join(tag_dir, COMPLETE)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return BROKEN, f"{marker}: missing or unreadable (the save did not finish)"
    if not isinstance(info, dict) or info.get("world_size") != world_size:
        world = info.get("world_size") if isinstance(info, dict) else None
        return BROKEN, f"{tag_dir}: written by {world} ranks, this run has {world_size}"
    files = files_for_rank(tag_dir, rank)
    own = os.path.join(tag_dir, f"train_state_rank{rank}.pt")
    if own not in files:
        return BROKEN, f"{own}: missing"
    if not any("model_states" in os.path.basename(p) for p in files):
        return BROKEN, f"{tag_dir}: no model_states file"
    for path in files:
        try:
            safe_load(path, mmap=True)
        except UnsafeCheckpoint as e:
            return UNSAFE, str(e)
        except CheckpointError as e:
            return BROKEN, str(e)
    return OK, ""


def find_resume_tag(ckpt_dir: str, rank: int, world_size: int, agree: Callable[[int], int],
                    warn: Callable[[str], None]) -> Optional[str]:
    """The tag to resume from: `latest` if usable, else the newest usable step_N older than it; None (a fresh
    start) when no checkpoint was ever finished; CheckpointError when `latest` exists but nothing is usable.

    A file that weights_only refuses stops the resume (UnsafeCheckpoint): someone put it there, and falling back
    past it would hide that. `agree(verdict)` returns the max verdict over ranks (an all-reduce); it is called
    the same number of times on every rank because all ranks walk the same candidate list.
    """
    latest_path = os.path.join(ckpt_dir, "latest")
    latest = None
    if os.path.exists(latest_path):
        try:
            with open(latest_path) as f:
                latest = f.read().strip()
        except OSError as e:
            warn(f"{latest_path}: unreadable ({e}); looking for the newest intact checkpoint")
        if latest == "":
            warn(f"{latest_path}: empty; looking for the newest intact checkpoint")
            latest = None
    candidates = [name for _, name in list_tags(ckpt_dir)]
    if latest is not None:
        # never prefer a tag newer than `latest`: its save may not have finished on every rank
        candidates = [latest] + [c for c in candidates if _step(c) < _step(latest, default=1 << 62)]
    for tag in candidates:
        verdict, why = check_tag(ckpt_dir, tag, rank, world_size)
        worst = agree(verdict)
        if worst == OK:
            return tag
        if worst == UNSAFE:
            raise UnsafeCheckpoint(why if verdict == UNSAFE else f"{os.path.join(ckpt_dir, tag)}: another rank "
                                   "refused one of its files as unsafe (not loadable with weights_only=True)")
        warn(f"skipping checkpoint {tag}: {why or 'not intact on another rank'}")
    if latest is not None:   # there was a finished checkpoint once: starting over would silently lose it
        raise CheckpointError(f"{ckpt_dir}: no intact checkpoint to resume from (`latest` names {latest!r}; see the "
                              "warnings above); move the directory away or use a new --output_dir")
    if candidates:   # killed during its first save: nothing was ever finished
        warn(f"{ckpt_dir}: {', '.join(candidates)} never finished saving; starting from step 0")
    return None


def _step(tag: str, default: int = -1) -> int:
    m = _TAG.fullmatch(tag or "")
    return int(m.group(1)) if m else default


def remove_stale_tmp(ckpt_dir: str) -> list[str]:
    """Delete `*.tmp<pid>` files a killed writer left (in the checkpoint dir and its tags); returns their paths."""
    removed = []
    if not os.path.isdir(ckpt_dir):
        return removed
    dirs = [ckpt_dir] + [os.path.join(ckpt_dir, n) for _, n in list_tags(ckpt_dir)]
    for d in dirs:
        for name in os.listdir(d):
            if re.search(r"\.tmp\d+$", name):
                path = os.path.join(d, name)
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed
