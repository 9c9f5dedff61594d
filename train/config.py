"""YAML run configs -> typed dataclasses, validated once at start.

A config file has four sections: `model` (models.vlp.ModelConfig), `objectives` (name -> that objective's config
from the registry models.objectives.OBJECTIVES), `data` (datasets.config.DataConfig) and `train` (TrainConfig below).
The converter is driven by the dataclass type hints, so the other packages' configs get the same strict checks:
an unknown key, a wrong type or a bad literal is one ConfigError naming the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(Exception):
    """A bad config or command line; its message is the single line shown to the user (newlines are folded)."""

    def __init__(self, message: Any = ""):
        super().__init__(" ".join(str(message).split("\n")).strip())


@dataclass
class ActivationCheckpointingConfig:
    # Per tower: k = checkpoint the last k layers, -1 = all layers, 0 = none.
    vision: int = 0
    text: int = 0
    fusion: int = 0


@dataclass
class WandbConfig:
    # used when train.loggers holds "wandb" (optional package: pip install wandb)
    project: str = "glscl"
    name: Optional[str] = None            # W&B run name; default: W&B's
    mode: Literal["offline", "online"] = "offline"
    dir: Optional[str] = None             # default: <output_dir>/wandb


@dataclass
class StaircaseConfig:
    # train.schedule: staircase, the released ALBEF/SIMLA schedule (train/optim.py staircase_factor)
    steps_per_epoch: Optional[int] = None  # optimizer steps per epoch; required by the staircase
    epochs: int = 30                      # cosine length in epochs (SIMLA: 30)
    step_size: int = 100                  # iterations per warmup stair
    warmup_epochs: int = 20               # warmup stairs, despite the name (20 x 100 = 2,000 iterations)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8             # per rank, per forward pass
    global_batch_size: int = 8            # = micro_batch_size * accumulation * world_size
    max_steps: int = 1000                 # optimizer steps
    # fine-tuning: train this many passes over the task's training set; max_steps is then derived from it
    # (ceil(epochs x samples / global_batch_size)) and the value above is ignored
    epochs: Optional[float] = None
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None    # absolute warmup length; overrides warmup_ratio when set (SIMLA: 2000)
    warmup_start_ratio: float = 0.0       # warmup starts at this fraction of the peak lr (SIMLA: 1e-5/1e-4 = 0.1)
    # staircase: the released ALBEF/SIMLA schedule, parameters in train.staircase (warmup_ratio/steps unused)
    schedule: Literal["linear", "cosine", "staircase"] = "cosine"
    min_lr_ratio: float = 0.0
    staircase: StaircaseConfig = field(default_factory=StaircaseConfig)
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    lr_multipliers: dict[str, float] = field(default_factory=dict)   # parameter-name prefix -> lr factor
    # layer-wise LR decay (BEiT/ELECTRA style; null = off): in each tower, layer i of n gets a further factor
    # layer_decay ** (n - i); its embeddings ** (n + 1); the fusion, heads and everything else keep 1
    layer_decay: Optional[float] = None
    # which parameters skip weight decay: "ours" (biases, norms, position/class/temporal embeddings, temperatures,
    # mask tokens) or "official" (the released SCL code: biases and the text/fusion/MLM-head LayerNorms only)
    weight_decay_exclusions: Literal["ours", "official"] = "ours"
    # gradient of losses over features gathered from every rank (ITC, MGSC, MLTC's text term): "exact" (full batch)
    # or "official" (1/world_size of it, the released SCL code's AllGather_multi)
    gathered_grad: Literal["exact", "official"] = "exact"
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0                   # 0: evaluate only at the end
    eval_batch_size: int = 64
    save_every: int = 0                   # 0: save only at the end
    keep_last: int = 2                    # checkpoints kept (older step_N tags are deleted)
    # optimizer steps with a non-finite loss or gradient are skipped; this many in a row stop the run (exit 3)
    max_skipped_steps: int = 10
    activation_checkpointing: ActivationCheckpointingConfig = field(default_factory=ActivationCheckpointingConfig)
    output_dir: Optional[str] = None      # default: runs/<config file name>
    # a whole-model file (`convert_checkpoint.py zero-to-fp32` or `import --format scl`): a fresh run starts from its
    # weights (strict; optimizer, schedule and step start fresh); a resumed run takes its checkpoint instead
    init_from: Optional[str] = None
    # metric destinations (train/loggers.py): jsonl (required: resume truncates it), tensorboard, wandb
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # at the end, compare every rank's parameters (a full gather under ZeRO-3) and print the fingerprint
    check_ranks_in_sync: bool = False


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# A float field that may legitimately be inf/nan says so with `field(metadata={ALLOW_NONFINITE: True})`;
# every other float (also inside lists and mappings) must be finite.
ALLOW_NONFINITE = "allow_nonfinite"


def convert(tp: Any, value: Any, key: str, finite: bool = True) -> Any:
    """Check `value` against type hint `tp` and return it converted; raise ConfigError('key: ...') otherwise.

    finite: floats must be finite (not inf/nan)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key, finite)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(convert(a, v, f"{key}[{i}]", finite) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [convert(item, v, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {convert(kt, k, key, finite): convert(vt, v, f"{key}.{k}", finite) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string, so numeric-looking strings count as floats.
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)   # may still overflow to inf (1e999)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        try:
            value = float(value)
        except OverflowError:   # an int too large for a float
            raise ConfigError(f"{key}: {value} is too large for a float") from None
        if finite and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def build_dataclass(cls: type, value: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and wrong types are errors."""
    where = f"{key}: " if key else ""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{key + '.' if key else ''}{k}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = convert(hints[name], value[name], sub, finite=not f.metadata.get(ALLOW_NONFINITE, False))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: missing required key")
    try:
        obj = cls(**kwargs)
        if callable(getattr(obj, "validate", None)):   # models/ and datasets/ configs check their own ranges
            obj.validate()
        return obj
    except (TypeError, ValueError, ArithmeticError, AssertionError) as e:   # never a traceback for a bad value
        msg = str(e) or type(e).__name__
        # their messages usually name the dotted key already; add ours only when they do not
        raise ConfigError(msg if key and msg.startswith(key.split(".")[0] + ".") else f"{where}{msg}") from None


@dataclass
class Config:
    model: Any        # models.vlp.ModelConfig
    objectives: dict  # name -> models.objectives.OBJECTIVES[name].Config instance
    data: Any         # datasets.config.DataConfig
    train: TrainConfig
    name: str = "run"  # config file stem; names the default output dir
    task: Any = None   # fine-tuning entry points: their `task:` section (the entry's dataclass)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.match(r"^[A-Za-z_][\w.]*$", key):
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value")
    try:
        return key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse value {raw!r} as YAML") from None


def apply_override(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping, cannot set {key}")
        node = child
    node[parts[-1]] = value


def _validate_train(t: TrainConfig) -> None:
    def check(ok, key, msg):
        if not ok:
            raise ConfigError(f"train.{key}: {msg}")
    check(t.micro_batch_size > 0, "micro_batch_size", "must be > 0")
    check(t.global_batch_size > 0, "global_batch_size", "must be > 0")
    check(t.max_steps > 0, "max_steps", "must be > 0")
    check(t.epochs is None or t.epochs > 0, "epochs", f"must be null or > 0, got {t.epochs}")
    check(t.layer_decay is None or 0 < t.layer_decay <= 1, "layer_decay", f"must be null or in (0, 1], got {t.layer_decay}")
    check(t.lr > 0, "lr", "must be > 0")
    check(0 <= t.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
    check(0 <= t.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    check(t.warmup_steps is None or t.warmup_steps >= 0, "warmup_steps", f"must be null or >= 0, got {t.warmup_steps}")
    check(0 <= t.warmup_start_ratio <= 1, "warmup_start_ratio", f"must be in [0, 1], got {t.warmup_start_ratio}")
    sc = t.staircase
    if t.schedule == "staircase":
        check(sc.steps_per_epoch is not None, "staircase.steps_per_epoch", "is required when train.schedule is staircase")
        check(t.warmup_steps is None, "warmup_steps",
              "not used by schedule staircase (its warmup is train.staircase.warmup_epochs x step_size)")
    check(sc.steps_per_epoch is None or sc.steps_per_epoch > 0, "staircase.steps_per_epoch",
          f"must be > 0, got {sc.steps_per_epoch}")
    check(sc.epochs > 0, "staircase.epochs", f"must be > 0, got {sc.epochs}")
    check(sc.step_size > 0, "staircase.step_size", f"must be > 0, got {sc.step_size}")
    check(sc.warmup_epochs >= 0, "staircase.warmup_epochs", f"must be >= 0, got {sc.warmup_epochs}")
    check(len(t.betas) == 2, "betas", "expected 2 values")
    check(all(0 <= b < 1 for b in t.betas), "betas", f"each must be in [0, 1), got {t.betas}")
    check(t.eps > 0, "eps", f"must be > 0, got {t.eps}")
    check(t.weight_decay >= 0, "weight_decay", f"must be >= 0, got {t.weight_decay}")
    for prefix, mult in t.lr_multipliers.items():
        check(mult >= 0, f"lr_multipliers.{prefix}", f"must be >= 0, got {mult}")
    check(0 <= t.seed < 2 ** 32, "seed", f"must be in [0, 2**32), got {t.seed}")
    check(t.log_every > 0, "log_every", "must be > 0")
    check(t.eval_every >= 0, "eval_every", "must be >= 0")
    check(t.save_every >= 0, "save_every", "must be >= 0")
    check(t.keep_last >= 1, "keep_last", "must be >= 1")
    check(t.max_skipped_steps >= 1, "max_skipped_steps", "must be >= 1")
    check(t.eval_batch_size > 0, "eval_batch_size", "must be > 0")
    for tower in ("vision", "text", "fusion"):
        k = getattr(t.activation_checkpointing, tower)
        check(k >= -1, f"activation_checkpointing.{tower}", "must be -1 (all), 0 (none) or a layer count")
    check(t.output_dir is None or t.output_dir.strip() != "", "output_dir", "must be a non-empty path")
    from train.loggers import LOGGER_NAMES   # here: train.loggers imports this module
    for name in t.loggers:
        check(name in LOGGER_NAMES, "loggers", f"unknown logger {name!r} (known: {', '.join(LOGGER_NAMES)})")
    check(len(set(t.loggers)) == len(t.loggers), "loggers", f"a logger is named twice: {t.loggers}")
    check("jsonl" in t.loggers, "loggers", "must include jsonl (metrics.jsonl; resume truncates it)")
    check(t.wandb.dir is None or t.wandb.dir.strip() != "", "wandb.dir", "must be a non-empty path")


def load_tree(path: str, overrides: list[str] = ()) -> dict:
    """Read YAML `path` and apply dotted overrides -> the raw config tree (not yet validated)."""
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:   # a directory, no permission, a binary file
        raise ConfigError(f"{path}: cannot read config file: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        for text in overrides:
            apply_override(tree, *parse_override(text))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return tree


def merge_tree(base: Any, over: Any) -> Any:
    """`over` deep-merged onto `base` (mappings merge key by key; anything else in `over` replaces)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge_tree(base[k], v) if k in base else v
        return out
    return over


def load_config(path: str, overrides: list[str] = (), task_cls: Optional[type] = None,
                tree: Optional[dict] = None) -> Config:
    """Read YAML `path`, apply dotted overrides, and validate into a Config. Errors: ConfigError 'path: key: msg'.
    task_cls: a fine-tuning entry's `task:` dataclass (the section is then allowed, objectives may be empty).
    tree: an already loaded (and possibly merged) tree instead of reading `path` again."""
    if tree is None:
        tree = load_tree(path, overrides)
    try:
        return config_from_dict(tree, name=os.path.splitext(os.path.basename(path))[0], task_cls=task_cls)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(tree: dict, name: str = "run", task_cls: Optional[type] = None) -> Config:
    # Imported here so that `train.config` can be loaded (e.g. for --help) without importing torch.
    from models.vlp import ModelConfig
    from models.objectives import OBJECTIVES
    from datasets.config import DataConfig

    sections = ["model", "objectives", "data", "train"] + (["task"] if task_cls is not None else [])
    unknown = [k for k in tree if k not in sections]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key (allowed: {', '.join(sections)})")
    for s in ("model", "data") + (("objectives",) if task_cls is None else ()):
        if s not in tree:
            raise ConfigError(f"{s}: missing required section")
    objectives_raw = tree.get("objectives") or {}
    if not isinstance(objectives_raw, dict) or not (objectives_raw or task_cls is not None):
        raise ConfigError("objectives: expected a non-empty mapping of objective name -> settings")
    objectives = {}
    for obj_name, raw in objectives_raw.items():
        if obj_name not in OBJECTIVES:
            raise ConfigError(f"objectives.{obj_name}: unknown objective (known: {', '.join(OBJECTIVES)})")
        obj = objectives[obj_name] = build_dataclass(OBJECTIVES[obj_name].Config, raw, f"objectives.{obj_name}")
        weight = getattr(obj, "weight", None)   # every objective's loss weight, also of objectives added later
        if weight is not None and not weight >= 0:
            raise ConfigError(f"objectives.{obj_name}.weight: must be >= 0, got {weight}")
    train = build_dataclass(TrainConfig, tree.get("train"), "train")
    _validate_train(train)
    if train.output_dir is None:
        train.output_dir = os.path.join("runs", name)
    task = build_dataclass(task_cls, tree.get("task"), "task") if task_cls is not None else None
    return Config(model=build_dataclass(ModelConfig, tree["model"], "model"), objectives=objectives,
                  data=build_dataclass(DataConfig, tree["data"], "data"), train=train, name=name, task=task)


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of a Config (for saving next to a run and in checkpoints)."""
    out = {"model": dataclasses.asdict(cfg.model),
           "objectives": {k: dataclasses.asdict(v) for k, v in cfg.objectives.items()},
           "data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train)}
    if cfg.task is not None:
        out["task"] = dataclasses.asdict(cfg.task)
    return out
