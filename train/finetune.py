"""What every fine-tuning entry point shares (train/finetune_<task>.py): the task section, --init, --eval_only,
epoch schedules, the best checkpoint. The loop, launcher, checkpoints, logging and signals are pretraining's
(train/engine.py, train/launch.py); a task script only says how to build its dataset, model and evaluator:

    @dataclass
    class MyTask(finetune.TaskSection):        # the config's `task:` section
        best_metric: str = "acc"
        ...
    def build(cfg, dist) -> launch.Built: ...  # finetune.load_init(model, cfg.task.init); finetune.built(...)
    ENTRY = finetune.entry("train/finetune_my.py", __doc__, MyTask, build)

The model: `--init FILE` (convert_checkpoint.py to-finetune output, any whole-model file, or a DeepSpeed run /
checkpoint dir) supplies the architecture: the config's `model:` keys are merged over the file's own model config
(so a fine-tune config states only what changes, e.g. vision.img_size), and its weights are loaded strictly into
the task model: every backbone tensor must be there with its shape, except the position embedding (resampled to
the task resolution) and the temporal table (resized to the task's frames); what is new (the task head) and what
the file has that the task does not use are listed in one line.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from train import launch
from train.config import ConfigError


@dataclass
class TaskSection:
    """Fields every task's `task:` section has; a task subclasses it with its own data and evaluation settings."""
    init: Optional[str] = None          # --init: the weights to start from (see the module docstring)
    eval_only: bool = False             # --eval_only: evaluate --init and exit, no training
    best_metric: str = "score"          # the eval key (higher is better) whose best checkpoint is kept


@dataclass
class AnnotatedImages:
    """A split given as one annotation file and the directory its images are in (NLVR2, SNLI-VE)."""
    annotations: str
    image_root: str

    def check(self, where: str) -> None:
        if not os.path.isfile(self.annotations):
            raise ValueError(f"{where}.annotations: no such file {self.annotations!r}")
        if not os.path.isdir(self.image_root):
            raise ValueError(f"{where}.image_root: no such directory {self.image_root!r}")


class TrainEvalTest:
    """For a task section with `train` (a list of sources), `eval` and `test` (optional sources), each source having
    check(where): the shared rules and file checks."""

    def validate_splits(self) -> None:
        if not self.train and not self.eval_only:
            raise ValueError("task.train: lists no source")
        if self.eval is None and self.test is None:
            raise ValueError("task.eval / task.test: set at least one")

    def check_files(self) -> None:
        for i, src in enumerate(self.train):
            src.check(f"task.train[{i}]")
        for name in ("eval", "test"):
            if getattr(self, name) is not None:
                getattr(self, name).check(f"task.{name}")


def read_split(read: Callable, src, what: str, items_name: str) -> list:
    """read(annotations, image_root) -> (items, skipped counts) for one split; a file with no usable item or a
    wrong layout is one ConfigError naming `what`; the skipped counts are printed on rank 0."""
    try:
        items, skipped = read(src.annotations, src.image_root)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    if not items:
        raise ConfigError(f"{what}: {src.annotations} holds no usable {items_name} (skipped {dict(skipped)})")
    if skipped and os.environ.get("RANK", "0") == "0":
        print(f"{what}: {len(items)} {items_name}; skipped {dict(skipped)}", flush=True)
    return items


def entry(prog: str, description: str, task_cls: type, build: Callable, flags: tuple = ()) -> launch.Entry:
    """flags: ((option, task override key, help), ...), e.g. ("--visualize", "task.visualize", "...")."""
    return launch.Entry(prog=prog, description=description, build=build, task_config=task_cls, task_flags=flags)


# ----------------------------------------------------------------------------------------------- config
def init_model_config(path: str) -> dict:
    """The run config stored with a weights file or DeepSpeed checkpoint (read without loading the weights)."""
    import json

    if os.path.isdir(path):
        from train.checkpoint_io import CheckpointError, safe_load
        from train.convert_checkpoint import UserError, _model_states_file, resolve_ds_checkpoint
        try:
            root, tag = resolve_ds_checkpoint(path)
            states = safe_load(_model_states_file(os.path.join(root, tag)), mmap=True)
        except (UserError, CheckpointError) as e:
            raise ConfigError(f"task.init: {e}") from None
        config = states.get("config") if isinstance(states, dict) else None
    elif os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ConfigError(f"task.init: {path}: expected a .safetensors file written by train/convert_checkpoint.py "
                              "or a DeepSpeed run / checkpoint directory")
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a corrupt header
            raise ConfigError(f"task.init: {path}: not a readable safetensors file ({e})") from None
        if meta.get("kind") != "vlp":
            raise ConfigError(f"task.init: {path}: kind is {meta.get('kind')!r}; fine-tuning starts from a whole "
                              "model (`python train/convert_checkpoint.py to-finetune RUN OUT.safetensors`)")
        try:
            config = json.loads(meta.get("config", "null"))
        except ValueError:
            config = None
    else:
        raise ConfigError(f"task.init: no such file or directory {path!r}")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"task.init: {path}: holds no run config with a model section")
    return config


def resolve_tree(tree: dict) -> dict:
    """A fine-tune config tree with --init's model config underneath its own `model:` keys."""
    from train.config import merge_tree

    task = tree.get("task") if isinstance(tree.get("task"), dict) else {}
    init = task.get("init")
    if isinstance(init, str) and init:
        base = init_model_config(init)["model"]
        tree = {**tree, "model": merge_tree(base, tree.get("model") or {})}
    return tree


# ----------------------------------------------------------------------------------------------- weights
def _brief(keys: list[str]) -> str:
    """Names grouped by their first two components: `head.* (4), itc.* (6)`."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:2]) + ".*" if len(parts) > 2 else k
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


def load_init(model, path: Optional[str], new_prefixes: tuple[str, ...] = ("head.",), verbose: bool = True) -> dict:
    """Load `path` into `model` strictly (see the module docstring); returns {"new", "dropped", "changes"}.

    new_prefixes: the task's own parameters, which the file may lack (they keep their fresh init); momentum copies
    the file lacks start as copies of its online weights. A model with more modality types than the file
    (model.fusion.num_token_types: NLVR2's 3) keeps the file's token-type rows and starts the new ones as copies of
    its image row (1), as SCL does. Any other missing key, or a shape that cannot be resampled, is a ConfigError
    naming it."""
    if path is None:
        if verbose:
            print("task.init not set: every weight starts from its fresh init", flush=True)
        return {"new": [], "dropped": [], "changes": []}
    import torch

    from models.momentum import online_key
    from models.weights import WeightsError, resample_pos_embed, resize_temporal_embed
    from train.convert_checkpoint import UserError, load_input

    try:
        sd, meta = load_input(path)
    except (UserError, WeightsError) as e:
        raise ConfigError(f"task.init: {e}") from None
    own = model.state_dict()
    changes = []
    for key in ("vision.pos_embed", "momentum.copies.vision.pos_embed"):
        if key in sd and key in own and sd[key].shape != own[key].shape:
            old, new = sd[key], own[key]
            g_old, g_new = math.isqrt(old.shape[1] - 1), math.isqrt(new.shape[1] - 1)
            try:
                sd[key] = resample_pos_embed(old, (g_new, g_new), (g_old, g_old))
            except (WeightsError, RuntimeError) as e:
                raise ConfigError(f"task.init: {path}: {key} {tuple(old.shape)} cannot be resampled to "
                                  f"{tuple(new.shape)}: {e}") from None
            changes.append(f"{key} {g_old}x{g_old} -> {g_new}x{g_new}")
    trained = int(((meta.get("config") or {}).get("data") or {}).get("num_frames", 1))
    for key in ("vision.temporal_embed", "momentum.copies.vision.temporal_embed"):
        if key in sd and key in own and sd[key].shape[1] != own[key].shape[1]:
            try:
                table = resize_temporal_embed(sd[key], own[key].shape[1], min(trained, sd[key].shape[1]))
                sd[key] = table[:, : own[key].shape[1]]
            except WeightsError as e:
                raise ConfigError(f"task.init: {path}: {key}: {e}") from None
            changes.append(f"{key} {tuple(sd[key].shape)}")
    for key in ("fusion.token_type.weight", "momentum.copies.fusion.token_type.weight"):
        # more modality types than the file has (NLVR2's second image): the file's rows kept, the new rows copied
        # from its image row (1), as SCL does; fewer rows than the file's stay a shape error below
        if key in sd and key in own and sd[key].dim() == own[key].dim() == 2 and sd[key].shape[0] >= 2 \
                and sd[key].shape[1] == own[key].shape[1] and sd[key].shape[0] < own[key].shape[0]:
            old, n = sd[key], own[key].shape[0]
            sd[key] = torch.cat([old, old[1:2].expand(n - old.shape[0], -1)])
            changes.append(f"{key.removesuffix('.weight')} {old.shape[0]} -> {n} rows (new rows from the image row)")
    for k in own:
        if k not in sd and online_key(k) in sd:
            sd[k] = sd[online_key(k)]
    new = [k for k in own if k not in sd]
    missing = [k for k in new if not k.startswith(new_prefixes)]
    if missing:
        raise ConfigError(f"task.init: {path} lacks {len(missing)} tensors the model needs, e.g. {missing[0]!r} "
                          "(written for another model config? its model section is the base of this run's)")
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"task.init: {path}: {k} has shape {tuple(sd[k].shape)}, the model needs "
                          f"{tuple(own[k].shape)} (a model: key in the fine-tune config that does not fit the file?)")
    dropped = sorted(k for k in sd if k not in own)
    for k in dropped:
        del sd[k]
    for k in new:
        sd[k] = own[k]
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    for name, m in model.named_modules():   # new task parts that start from loaded weights (the rank head: ITM's)
        hook = getattr(m, "init_from_backbone", None)
        if callable(hook) and all(f"{name}.{p}" in new for p, _ in m.named_parameters()):
            hook(model)
    if verbose:
        print(f"task.init {path}: loaded {len(own) - len(new)} tensors; new: {_brief(new) or 'none'}; dropped: "
              f"{_brief(dropped) or 'none'}" + (f"; {'; '.join(changes)}" if changes else ""), flush=True)
    return {"new": new, "dropped": dropped, "changes": changes}


# ----------------------------------------------------------------------------------------------- run
def derive_max_steps(cfg, loader, world_size: int) -> None:
    """train.epochs set -> train.max_steps = ceil(epochs x micro batches per epoch per rank / accumulation)."""
    t = cfg.train
    if t.epochs is None or loader is None:   # no loader: --eval_only
        return
    gas = t.global_batch_size // (t.micro_batch_size * world_size)
    steps_per_epoch = loader.batches_per_epoch / gas
    t.max_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    if world_size and os.environ.get("RANK", "0") == "0":
        print(f"train.epochs {t.epochs:g}: {loader.batches_per_epoch} micro batches per epoch per rank / "
              f"accumulation {gas} -> train.max_steps {t.max_steps}", flush=True)


def built(cfg, dist, model, loader, evaluate: Callable[[Any], dict]) -> launch.Built:
    """The launcher's Built for a task: epochs -> steps, and the best checkpoint kept by task.best_metric."""
    derive_max_steps(cfg, loader, dist.world_size)
    return launch.Built(model, loader, evaluate, setup=lambda engine: engine.keep_best(cfg.task.best_metric))
