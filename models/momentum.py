"""Momentum (EMA) copies of submodules and feature queues: the parts ALBEF/SIMLA-style momentum distillation asks for.

Plain modules. The EMA update itself, its fp32 shadow and the checkpoint parts live in train/momentum.py (the
engine's after-step hook): under bf16 and ZeRO-3 the update has to work on DeepSpeed's local parameter data.

    self.momentum = MomentumCopies(self, ["vision", "text", "itc"], coefficient=0.995)   # last in __init__
    ...
    with torch.no_grad():
        image_m = self.momentum.copy_of("vision")(pixels)
    self.image_queue = FeatureQueue(size=65536, dim=256)
    self.image_queue.enqueue(gathered_image_feats_m)                                    # under no_grad

The source of a MomentumCopies is always the module that holds it as a direct attribute (its parent): names are
dotted paths relative to that module, and `pairs(owner)` lines the online parameters up with their copies.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _full_shape(p: torch.Tensor) -> torch.Size:
    # A ZeRO-3 partitioned parameter has an empty .data; its real shape is kept in `ds_shape` (duck-typed, so this
    # file needs no DeepSpeed import).
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape


def online_key(key: str, owner: str = "momentum") -> Optional[str]:
    """The online state-dict key a momentum copy's key mirrors ("momentum.copies.fusion__image_in.weight" ->
    "fusion.image_in.weight", `owner` being the MomentumCopies' attribute name), or None for any other key. Loaders
    use it to start copies a file lacks from the file's online weights, as a fresh build does."""
    head = f"{owner}.copies."
    if not key.startswith(head) or "." not in key[len(head):]:
        return None
    name, rest = key[len(head):].split(".", 1)
    return f"{name.replace('__', '.')}.{rest}"


class MomentumCopies(nn.Module):
    """Frozen deep copies of named submodules of `source`, kept as an EMA of them by train.momentum.EmaUpdate.

    `names` are dotted submodule paths of `source` ("vision", "fusion.image_in", "itc"); the copies sit in an
    nn.ModuleDict under the name with "." -> "__" (so they are saved with the model as `<here>.copies.<key>.*`).
    Every copied parameter has requires_grad=False: the optimizer never sees them. The copies follow the parent's
    train()/eval() mode like any submodule; callers run them under torch.no_grad(). Parameters shared between the
    named submodules stay shared in the copies (one deepcopy memo). Buffers are copied once and not averaged.
    Build it after the source's own parameters (at the end of the owner's __init__) and before any ZeRO-3
    partitioning; copying does not touch torch's RNG, so adding it never changes the model's initialisation.
    """

    def __init__(self, source: nn.Module, names: Sequence[str], coefficient: float):
        super().__init__()
        if isinstance(names, str):
            raise ValueError(f"MomentumCopies: names must be a sequence of submodule names, got the string {names!r}")
        names = list(names)
        if not names:
            raise ValueError("MomentumCopies: names is empty")
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) \
                or not math.isfinite(coefficient) or not 0.0 <= coefficient < 1.0:
            raise ValueError(f"MomentumCopies: coefficient must be a number in [0, 1), got {coefficient!r}")
        keys = {}
        for n in names:
            if not isinstance(n, str) or not n or n.startswith(".") or n.endswith(".") or ".." in n:
                raise ValueError(f"MomentumCopies: bad submodule name {n!r}")
            key = n.replace(".", "__")
            if key in keys:
                raise ValueError(f"MomentumCopies: names {keys[key]!r} and {n!r} collide (both stored as {key!r})")
            keys[key] = n
        for a in names:
            for b in names:
                if a != b and b.startswith(a + "."):
                    raise ValueError(f"MomentumCopies: {b!r} lies inside {a!r}; name each submodule once")
        subs = []
        for n in names:
            try:
                subs.append(source.get_submodule(n))
            except AttributeError:
                raise ValueError(f"MomentumCopies: {type(source).__name__} has no submodule {n!r}") from None
        # deepcopy draws no random numbers today; fork_rng makes that a guarantee for any module (CPU generator only,
        # so CUDA is never initialised from here).
        with torch.random.fork_rng(devices=[]):
            memo: dict = {}
            copies = [copy.deepcopy(m, memo) for m in subs]
        for c in copies:
            for p in c.parameters():
                p.requires_grad_(False)
        self.names: tuple[str, ...] = tuple(names)
        self.coefficient = float(coefficient)
        self.copies = nn.ModuleDict({n.replace(".", "__"): c for n, c in zip(names, copies)})

    def copy_of(self, name: str) -> nn.Module:
        """The momentum copy of submodule `name` (as given to __init__)."""
        if name not in self.names:
            raise KeyError(f"MomentumCopies: no copy of {name!r}; have {list(self.names)}")
        return self.copies[name.replace(".", "__")]

    def pairs(self, source: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(dotted parameter name in `source`, online parameter, its momentum copy) for every copied parameter, in
        a fixed order (names as given, then each submodule's named_parameters order). A parameter shared between
        submodules appears once. ValueError if `source` and the copies differ in names, shapes or sharing."""
        out = []
        online_of: dict[int, int] = {}   # id(copy) -> id(online): the sharing pattern must be the same on both sides
        for name in self.names:
            try:
                online_mod = source.get_submodule(name)
            except AttributeError:
                raise ValueError(f"MomentumCopies.pairs: {type(source).__name__} has no submodule {name!r}") from None
            online = list(online_mod.named_parameters(remove_duplicate=False))
            moment = list(self.copy_of(name).named_parameters(remove_duplicate=False))
            on_names, mo_names = [n for n, _ in online], [n for n, _ in moment]
            if on_names != mo_names:
                diff = sorted(set(on_names) ^ set(mo_names))[:3] or on_names[:3]
                raise ValueError(f"MomentumCopies.pairs: {name!r} differs from its momentum copy: parameters "
                                 f"{len(on_names)} vs {len(mo_names)}, e.g. {diff}")
            for (pn, p), (_, q) in zip(online, moment):
                full = f"{name}.{pn}"
                if p is q:
                    raise ValueError(f"MomentumCopies.pairs: {full} is the same tensor as its momentum copy")
                if _full_shape(p) != _full_shape(q):
                    raise ValueError(f"MomentumCopies.pairs: {full} has shape {tuple(_full_shape(p))} but its "
                                     f"momentum copy {tuple(_full_shape(q))}")
                seen = online_of.get(id(q))
                if seen is not None:
                    if seen != id(p):
                        raise ValueError(f"MomentumCopies.pairs: {full}: parameter sharing differs between the "
                                         f"source and the momentum copies")
                    continue
                online_of[id(q)] = id(p)
                out.append((full, p, q))
        if len(set(online_of.values())) != len(online_of):
            raise ValueError("MomentumCopies.pairs: parameter sharing differs between the source and the momentum "
                             "copies (one online parameter has two copies)")
        return out

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, coefficient={self.coefficient}"


class FeatureQueue(nn.Module):
    """A ring buffer of `size` feature rows of width `dim` (ALBEF's image/text queues), saved with the model.

    `features` starts as L2-normalised Gaussian rows (as ALBEF does), `ptr` is the next row to write. The caller
    gathers features across ranks and detaches them before `enqueue`, so every rank holds the same queue.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"FeatureQueue: size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"FeatureQueue: dim must be a positive int, got {dim!r}")
        self.size, self.dim = size, dim
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    def _apply(self, fn, recurse=True):
        # Floating buffers only follow device moves: DeepSpeed casts the whole model to bf16, and a bf16 queue
        # would round every stored feature.
        before = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor) -> None:
        """Write the (n, dim) rows at ptr, wrapping around the end; ptr advances by n (mod size).
        n must divide size (ALBEF's rule: the queue always holds whole batches)."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"FeatureQueue.enqueue: expected (n, {self.dim}) features, got {tuple(feats.shape)}")
        n = feats.shape[0]
        if n == 0 or self.size % n:
            raise ValueError(f"FeatureQueue.enqueue: queue size {self.size} is not a multiple of the number of rows "
                             f"{n}")
        start = int(self.ptr.item())
        index = (torch.arange(n, device=self.features.device) + start) % self.size
        self.features.index_copy_(0, index, feats.detach().to(device=self.features.device, dtype=self.features.dtype))
        self.ptr.fill_((start + n) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
