"""Checks of a whole run, made by train/pretrain.py's prepare() before anything heavy is built.

`train.config` validates each section on its own (types, ranges, unknown keys; models/ and datasets/ configs check
their own fields in `validate()`). What needs two sections at once, the DeepSpeed config, or the machine and the
file system lives here. Every failure is one ConfigError line naming the file and the dotted key:

  check_config(cfg, path)            cross-section rules that hold for any use of the config (flops.py included)
  check_ds_config(ds, path)          the DeepSpeed JSON: block shapes, ZeRO stage, precision this machine supports
  check_run_inputs(cfg, path)        what only a real run needs: data to train on, weight files, tokenizer, output dir
  check_data_sources(cfg, path, n)   shards exist and suffice for n ranks x workers (datasets.loader.check_sources)
"""
from __future__ import annotations

import os
from typing import NoReturn

from train.config import ConfigError


def _fail(path: str, key: str, msg: str) -> NoReturn:
    raise ConfigError(f"{path}: {key}: {msg}")


def check_config(cfg, path: str) -> None:
    """Rules between sections (model vs data vs objectives vs train); no file system access."""
    vision, data = cfg.model.vision, cfg.data
    if data.image_size != vision.img_size:
        _fail(path, "data.image_size", f"{data.image_size} differs from model.vision.img_size={vision.img_size}; "
              "the loader must produce the size the vision tower's position embeddings are built for")
    sources = list(data.train) + list(data.eval)
    if any(s.modality == "video" for s in sources) and data.num_frames > vision.max_frames:
        _fail(path, "data.num_frames", f"{data.num_frames} is more than model.vision.max_frames={vision.max_frames} "
              "(the size of the temporal embedding table)")
    from models.objectives import OBJECTIVES

    p = data.mlm_probability
    if p is not None and not any("mlm_labels" in OBJECTIVES[n].batch_keys for n in cfg.objectives):
        _fail(path, "data.mlm_probability", "is set but no enabled objective reads the masked text it adds "
              "(enable objectives.mlm)")
    from models.vlp import check_families
    try:
        check_families(cfg.objectives, cfg.model.family)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.model.heads is not None:
        from models.vlp import heads_needed
        missing = [h for h in heads_needed(cfg.objectives) if h not in cfg.model.heads]
        if missing:
            _fail(path, "model.heads", f"the enabled objectives need {missing} too")
    users = {n: OBJECTIVES[n].momentum_coefficient(c) for n, c in cfg.objectives.items()}
    users = {n: m for n, m in users.items() if m is not None}
    first, m0 = next(iter(users.items()), (None, None))
    for name, m in users.items():   # one set of momentum encoders per model: one EMA coefficient
        if m != m0:
            _fail(path, f"objectives.{name}.momentum", f"{m} differs from objectives.{first}.momentum={m0}; the "
                  "objectives share one set of momentum encoders, so they must use one EMA coefficient")
    for name, obj_cfg in cfg.objectives.items():   # each objective's own rules against the run (models/objectives)
        try:
            OBJECTIVES[name].check_run(obj_cfg, cfg)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None


def check_ds_config(ds: dict, path: str) -> None:
    """The DeepSpeed JSON before train.engine.prepare_ds_config reads it: blocks are objects, a known ZeRO stage, and
    a precision this machine's accelerator supports (imports deepspeed's accelerator, a few hundred ms)."""
    for block in ("fp16", "bf16", "bfloat16"):
        if block in ds and not isinstance(ds[block], dict):
            _fail(path, block, f"expected an object such as {{\"enabled\": true}}, got {ds[block]!r}")
    zero = ds.get("zero_optimization", {})
    if isinstance(zero, bool):   # DeepSpeed's legacy form: true = stage 1
        zero = {"stage": int(zero)}
    if not isinstance(zero, dict):
        _fail(path, "zero_optimization", f"expected an object such as {{\"stage\": 1}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        _fail(path, "zero_optimization.stage", f"expected 0, 1, 2 or 3, got {stage!r}")
    wanted = [(block, name) for block, name in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16"))
              if ds.get(block, {}).get("enabled") is True]
    if not wanted:
        return
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    for block, name in wanted:
        if not getattr(accel, f"is_{name}_supported")():
            _fail(path, f"{block}.enabled", f"{name} is not supported by this machine's accelerator "
                  f"({accel.device_name()}); use a {'bf16 or ' if name == 'fp16' else ''}fp32 ds_config "
                  f"(e.g. ds_configs/cpu_demo.json on CPU)")


def check_output_dir(out: str, path: str) -> None:
    """The run directory exists as a writable directory or can be created (nothing is created here)."""
    key = "train.output_dir"
    if os.path.lexists(out) and not os.path.isdir(out):
        _fail(path, key, f"{out!r} exists and is not a directory (set --output_dir or train.output_dir to a "
              "directory)")
    if os.path.isdir(out):
        if not os.access(out, os.W_OK | os.X_OK):
            _fail(path, key, f"{out!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail(path, key, f"cannot create {out!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(path, key, f"cannot create {out!r}: {parent!r} is not writable")


def check_text(cfg, path: str) -> None:
    """Tokenizer and text model fit each other and the data: loads the tokenizer (well under a second)."""
    from models.text import load_tokenizer, model_sizes

    text, data = cfg.model.text, cfg.data
    name = text.tokenizer or text.pretrained
    key = "model.text.tokenizer" if text.tokenizer else "model.text.pretrained"
    if name != "minilm" and not os.path.isdir(name):
        _fail(path, key, f"no such directory {name!r} (a local transformers tokenizer directory, or minilm)")
    try:
        tokenizer = load_tokenizer(text)
    except Exception as e:   # transformers raises OSError, ValueError, KeyError, ... for a broken directory
        _fail(path, key, f"cannot load a tokenizer from {name!r}: {type(e).__name__}: {e}")
    try:
        sizes = model_sizes(text)
    except (OSError, ValueError) as e:
        _fail(path, "model.text.pretrained", f"cannot read {text.pretrained!r}/config.json: {e}")
    where = "model.text.vocab_size" if text.pretrained is None else f"the vocab_size of {text.pretrained!r}"
    if "vocab_size" in sizes and len(tokenizer) > sizes["vocab_size"]:
        _fail(path, "model.text.vocab_size" if text.pretrained is None else key,
              f"the tokenizer has {len(tokenizer)} tokens but {where} is {sizes['vocab_size']}")
    if "max_text_len" in sizes and data.max_text_len > sizes["max_text_len"]:
        limit = ("model.text.max_position_embeddings" if text.pretrained is None
                 else f"the position table of {text.pretrained!r}")
        _fail(path, "data.max_text_len", f"{data.max_text_len} is longer than {limit} ({sizes['max_text_len']})")
    masking = sorted(set(cfg.objectives) & {"mlm", "mgsc", "mltc"})
    if masking and tokenizer.mask_token_id is None:
        _fail(path, f"objectives.{masking[0]}", f"needs a mask token, but the tokenizer {name!r} has none")


def check_run_inputs(cfg, path: str, need_train_sources: bool = True) -> None:
    """What only a real run needs (presets ship placeholder paths that flops.py and the tests accept).
    need_train_sources False: a fine-tuning run, whose data the `task:` section names."""
    check_config(cfg, path)
    if need_train_sources and not cfg.data.train:
        _fail(path, "data.train", "is empty; a run needs at least one train source ({shards: <pattern>, modality: "
              "image|video})")
    vision, text = cfg.model.vision, cfg.model.text
    if vision.pretrained and not os.path.isfile(vision.pretrained):
        raise ConfigError(f"{path}: model.vision.pretrained: no such file {vision.pretrained!r} (write it with "
                          "`python train/convert_checkpoint.py import ...`)")
    if text.pretrained not in (None, "minilm") and not os.path.isdir(text.pretrained):
        raise ConfigError(f"{path}: model.text.pretrained: no such directory {text.pretrained!r} (a local "
                          "transformers BERT/RoBERTa directory, or minilm)")
    init = cfg.train.init_from
    if init is not None and not os.path.isfile(init):
        raise ConfigError(f"{path}: train.init_from: no such file {init!r} (write one with `python "
                          "train/convert_checkpoint.py zero-to-fp32|import ...`)")
    if cfg.data.align_bench is not None:
        from datasets.align_bench import check_dir
        why = check_dir(cfg.data.align_bench)
        if why:
            _fail(path, "data.align_bench", why)
    check_output_dir(cfg.train.output_dir, path)
    check_text(cfg, path)


def check_data_sources(cfg, path: str, world_size: int) -> None:
    """Train/eval shards exist and are enough for world_size x data.num_workers readers. Delegates to
    datasets.loader.check_sources; a no-op while that does not exist."""
    import datasets.loader

    check_sources = getattr(datasets.loader, "check_sources", None)
    if check_sources is None:
        return
    try:
        check_sources(cfg.data, world_size)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
