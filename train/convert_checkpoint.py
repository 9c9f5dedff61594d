"""Checkpoint conversion: DeepSpeed -> one file, pretraining -> fine-tuning, public weights <-> our towers.

  python train/convert_checkpoint.py zero-to-fp32 CKPT OUT.safetensors
  python train/convert_checkpoint.py to-finetune IN OUT.safetensors [--image-size S] [--num-frames F]
  python train/convert_checkpoint.py import --format {hf-bert,hf-roberta,timm-vit,openai-clip} SRC OUT.safetensors
  python train/convert_checkpoint.py import --format scl|meter CKPT OUT.safetensors [--config Y] [--tokenizer D]
  python train/convert_checkpoint.py import --format dalle-dvae --trust-pickle encoder.pkl OUT.safetensors
  python train/convert_checkpoint.py import --format simla CKPT OUT.safetensors [--tokenizer D|minilm] [--config Y]
  python train/convert_checkpoint.py export --tower {vision,text} IN OUT_DIR
  python train/convert_checkpoint.py export --format scl IN OUT.ckpt
  python train/convert_checkpoint.py info FILE.safetensors

CKPT / IN may be a DeepSpeed checkpoint: a run dir, its checkpoints/ dir (uses `latest`) or one checkpoints/step_N
dir, of any ZeRO stage (0-3); it is consolidated to fp32 through DeepSpeed's Python API. Every file this tool writes
is safetensors with metadata: `kind` (vlp = a whole VLPModel, vision / text = one tower), the run config (`config`,
JSON) or the tower config, and the names it dropped. Loads are strict: missing/unexpected keys are named.
Exit code 2 = bad input (file, key, argument), with a one-line message.
The released SCL/GLSCL and METER checkpoints (official key names, Lightning files) are mapped by train/scl_format.py,
the released SIMLA ones (pretraining 4M, COCO retrieval) by train/simla_format.py.
The DALL-E dVAE encoder (kind dvae: SIMLA's frozen image tokenizer, models/dvae.py) is a pickled module: it is read
only with --trust-pickle, by a restricted unpickler that runs none of its code.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pickle
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train.config import ConfigError  # noqa: E402

# `to-finetune` drops, by name and listed in its output, what only pretraining uses: the parameters of every objective
# that declares itself pretraining-only (`Objective.pretrain_only`: MLM's head, MLTC's image mask token, ITA's queues,
# ...) and the momentum (EMA) copies (models/vlp.py pretrain_only_prefixes). Kept: the backbone (towers, fusion with
# its poolers, ITC projections + temperature, the ITM head, which METER/SCL initialise the retrieval re-ranker from);
# `--drop itm_head.` removes the latter.


class UserError(Exception):
    """Bad input; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------------------------- DeepSpeed checkpoints
def resolve_ds_checkpoint(path: str) -> tuple[str, str]:
    """A run dir, a checkpoints dir with `latest`, or a step dir -> (checkpoints dir, tag)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "checkpoints", "latest")):
        path = os.path.join(path, "checkpoints")
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            raise UserError(f"{latest}: names {tag!r}, which is not a directory in {path}")
        return path, tag
    if os.path.isdir(path) and any(n.endswith("model_states.pt") for n in os.listdir(path)):
        return os.path.dirname(path), os.path.basename(path)
    raise UserError(f"{path}: not a DeepSpeed checkpoint (no `latest` file and no *model_states.pt)")


def _model_states_file(tag_dir: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    raise UserError(f"{tag_dir}: no mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt")


def consolidate(path: str) -> tuple[dict, dict, dict]:
    """DeepSpeed checkpoint -> (fp32 state dict with VLPModel keys, run config, info)."""
    import torch

    root, tag = resolve_ds_checkpoint(path)
    tag_dir = os.path.join(root, tag)
    states_file = _model_states_file(tag_dir)
    try:
        states = torch.load(states_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{states_file}: cannot read with weights_only=True ({str(e).splitlines()[0][:200]})") from None
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    config = states.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{states_file}: holds no run config (client_state['config']); was it written by "
                        "train/engine.py?")
    if stage == 0:
        # No ZeRO partitions: the module state is complete in this file (in the training dtype).
        sd = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    else:
        from deepspeed.utils import logger as ds_logger
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed's consolidation unpickles with weights_only=False: first prove every file is plain data
        # (weights_only, mmap: the pickles are read, the tensor bytes are not).
        from train.checkpoint_io import CheckpointError, safe_load
        for name in sorted(os.listdir(tag_dir)):
            if name.endswith(".pt"):
                try:
                    safe_load(os.path.join(tag_dir, name), mmap=True)
                except CheckpointError as e:
                    raise UserError(str(e)) from None
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{tag_dir}: DeepSpeed could not consolidate this ZeRO-{stage} checkpoint: "
                            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
        sd = dict(sd)
    info = {"source": tag_dir, "zero_stage": stage, "step": states.get("step", states.get("global_steps")),
            "ds_version": states.get("ds_version")}
    return sd, config, info


# ------------------------------------------------------------------------------------------- run configs / models
def _parse_model_config(config: dict):
    from models.objectives import OBJECTIVES
    from models.vlp import ModelConfig
    from train.config import build_dataclass

    model_cfg = build_dataclass(ModelConfig, config.get("model"), "model")
    objectives = {}
    for name, raw in (config.get("objectives") or {}).items():
        if name not in OBJECTIVES:
            raise ConfigError(f"objectives.{name}: unknown objective (known: {', '.join(OBJECTIVES)})")
        objectives[name] = build_dataclass(OBJECTIVES[name].Config, raw, f"objectives.{name}")
    return model_cfg, objectives


def build_from_config(config: dict):
    """A fresh VLPModel for a run config (the reference for strict key checks)."""
    import torch

    from models.text import load_tokenizer
    from models.vlp import build_model

    model_cfg, objectives = _parse_model_config(config)
    torch.manual_seed(0)
    return build_model(model_cfg, objectives, load_tokenizer(model_cfg.text))


def verify_vlp(sd: dict, config: dict, what: str) -> None:
    from models.weights import check_keys

    check_keys(sd, build_from_config(config).state_dict(), what)


def text_hf_config(text_cfg: dict) -> dict | None:
    """The transformers config.json of the text tower a run config describes (None when its pretrained dir is not
    available here; `export --tower text` then says so)."""
    from models.text import TextConfig, _random_init_config, resolve_path

    cfg = TextConfig(**text_cfg)
    if cfg.pretrained is not None:
        try:
            with open(os.path.join(resolve_path(cfg.pretrained), "config.json")) as f:
                return json.load(f)
        except (FileNotFoundError, ImportError):
            return None
    return _random_init_config(cfg).to_dict()


def _check_out_file(path: str) -> None:
    if not path.endswith(".safetensors"):
        raise UserError(f"{path}: the output is a safetensors file; name it *.safetensors")


def load_input(path: str) -> tuple[dict, dict]:
    """A file we wrote (safetensors with metadata) or a DeepSpeed checkpoint dir -> (state dict, metadata)."""
    from models.weights import load_weights

    if os.path.isdir(path):
        sd, config, info = consolidate(path)
        return sd, {"kind": "vlp", "config": config, **info}
    sd, meta = load_weights(path)
    if "kind" not in meta:
        raise UserError(f"{path}: no `kind` metadata; not written by this tool (import public weights with "
                        "`import`, DeepSpeed checkpoints with `zero-to-fp32`)")
    out = dict(meta)
    for k in ("config", "dropped", "new", "vision_config", "text_config", "hf_config", "text_hf_config"):
        if k in out:
            out[k] = json.loads(out[k])
    return sd, out


def _print_dropped(dropped: list[str], why: str) -> None:
    if dropped:
        shown = ", ".join(dropped[:12]) + (f", ... ({len(dropped) - 12} more)" if len(dropped) > 12 else "")
        print(f"dropped {len(dropped)} tensors ({why}): {shown}")


# ------------------------------------------------------------------------------------------- commands
def cmd_zero_to_fp32(args) -> None:
    from models.weights import save_weights

    _check_out_file(args.out)
    sd, config, info = consolidate(args.ckpt)
    if not args.no_verify:
        verify_vlp(sd, config, f"{info['source']}: consolidated weights vs the model its config builds")
    meta = {"kind": "vlp", "config": config, "text_hf_config": text_hf_config(config["model"]["text"]),
            **{k: str(v) for k, v in info.items()}}
    save_weights(sd, args.out, meta)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n / 1e6:.2f}M values, fp32, from ZeRO-{info['zero_stage']} "
          f"{info['source']} (step {info['step']})")


def cmd_to_finetune(args) -> None:
    from models.weights import infer_vit_shape, resample_pos_embed, resize_temporal_embed, save_weights

    _check_out_file(args.output)
    sd, meta = load_input(args.input)
    if meta.get("kind") != "vlp":
        raise UserError(f"{args.input}: kind is {meta.get('kind')!r}; to-finetune needs a whole pretraining model "
                        "(kind 'vlp', from zero-to-fp32 or a DeepSpeed dir)")
    from models.vlp import heads_needed, pretrain_only_prefixes

    config = copy.deepcopy(meta["config"])
    _parse_model_config(config)   # unknown objectives / bad fields: one line, before anything is dropped
    objectives = config.get("objectives") or {}
    # The heads the pretraining objectives used stay in the backbone after those objectives are gone.
    if config["model"].get("heads") is None:
        config["model"]["heads"] = heads_needed(objectives)
    prefixes = pretrain_only_prefixes(objectives) + tuple(p if p.endswith(".") else p + "." for p in args.drop)
    dropped = sorted(k for k in sd if k.startswith(prefixes))
    for k in dropped:
        del sd[k]
    for name in list(objectives):
        if f"objectives.{name}." in prefixes:
            del objectives[name]
    heads = config["model"]["heads"]
    for h in [h for h in heads if any(k.startswith(prefixes) for k in (f"{h}.", f"{h}_head."))]:
        heads.remove(h)   # --drop itm_head. / --drop itc.
    vcfg, data = config["model"]["vision"], config.get("data") or {}
    changes = []
    if args.image_size is not None:
        shape = infer_vit_shape({k[len("vision."):]: v for k, v in sd.items() if k.startswith("vision.")},
                                f"{args.input}: vision tower")
        p = shape["patch_size"]
        if args.image_size <= 0 or args.image_size % p:
            raise UserError(f"--image-size {args.image_size} is not a positive multiple of the patch size {p}")
        g = args.image_size // p
        sd["vision.pos_embed"] = resample_pos_embed(sd["vision.pos_embed"], (g, g), (shape["grid"], shape["grid"]))
        changes.append(f"pos_embed {shape['grid']}x{shape['grid']} -> {g}x{g} patches ({args.image_size} px)")
        vcfg["img_size"] = args.image_size
        if "image_size" in data:
            data["image_size"] = args.image_size
    if args.num_frames is not None:
        trained = args.trained_frames if args.trained_frames is not None else int(data.get("num_frames", 1))
        old = sd["vision.temporal_embed"]
        new = resize_temporal_embed(old, args.num_frames, trained)
        sd["vision.temporal_embed"] = new
        how = ("unchanged" if new is old else
               f"{old.shape[1]} -> {new.shape[1]} rows ({'interpolated from the' if trained > 1 else 'zero-padded; '}"
               f"{trained} trained frame{'s' if trained != 1 else ''})")
        changes.append(f"temporal_embed for {args.num_frames} frames: {how}")
        vcfg["max_frames"] = int(new.shape[1])
        if "num_frames" in data:
            data["num_frames"] = args.num_frames
    if not config.get("objectives"):
        raise UserError(f"every objective was dropped ({', '.join(prefixes)}); keep at least one (e.g. itc)")
    for name in config["objectives"]:   # a kept objective must still find the heads it uses
        from models.objectives import OBJECTIVES
        lost = [h for h in OBJECTIVES[name].heads if h not in heads]
        if lost:
            raise UserError(f"--drop removed the {lost[0]!r} head that objectives.{name} (kept) uses; drop "
                            f"objectives.{name}. too")
    if not args.no_verify:
        verify_vlp(sd, config, f"{args.output}: fine-tuning init vs the model its config builds")
    save_weights(sd, args.output, {"kind": "vlp", "config": config, "text_hf_config": meta.get("text_hf_config")
                                   or text_hf_config(config["model"]["text"]), "dropped": dropped,
                                   "source": os.path.abspath(args.input), "stage": "finetune-init"})
    _print_dropped(dropped, "pretraining-only")
    for c in changes:
        print(c)
    print(f"wrote {args.output}: {len(sd)} tensors; objectives kept: {', '.join(config['objectives'])}")


def cmd_import_scl(args) -> None:
    """An official SCL/GLSCL/METER Lightning checkpoint -> a whole-model (kind vlp) file."""
    from models.weights import save_weights
    from train import scl_format

    _check_out_file(args.out)
    imported, config, meta = scl_format.import_checkpoint(args.src, args.config, args.tokenizer,
                                                          expect="meter" if args.format == "meter" else None)
    meta["text_hf_config"] = text_hf_config(config["model"]["text"])
    save_weights(imported.state_dict, args.out, meta)
    run_yaml = write_run_config(config, args.out)
    for note in imported.notes:
        print(note)
    by_reason: dict[str, list[str]] = {}
    for k in imported.dropped:
        by_reason.setdefault(scl_format.dropped_why(k), []).append(k)
    for why, names in by_reason.items():
        _print_dropped(names, why)
    n = sum(v.numel() for v in imported.state_dict.values())
    print(f"wrote {args.out}: {meta['format_in'].upper()} checkpoint (step {meta['step']}) -> "
          f"{len(imported.state_dict)} tensors, {n / 1e6:.2f}M values, fp32; objectives: "
          f"{', '.join(config['objectives'])}")
    print(f"wrote {run_yaml}: its run config with train.init_from = {args.out}; point data.* at your shards and "
          f"pretrain further: deepspeed train/pretrain.py --deepspeed_config ds_configs/zero1_bf16.json --config "
          f"{run_yaml}")


def cmd_import_simla(args) -> None:
    """A released SIMLA checkpoint (pretraining or COCO retrieval) -> a whole-model (kind vlp) file."""
    from models.weights import save_weights
    from train import simla_format

    _check_out_file(args.out)
    imported, config, meta = simla_format.import_checkpoint(args.src, args.config, args.tokenizer)
    meta["text_hf_config"] = text_hf_config(config["model"]["text"])
    save_weights(imported.state_dict, args.out, meta)
    run_yaml = write_run_config(config, args.out)
    for note in imported.notes:
        print(note)
    by_reason: dict[str, list[str]] = {}
    layout = meta["format_in"].split("-", 1)[1]
    for k in imported.dropped:
        by_reason.setdefault(simla_format.dropped_why(k, layout), []).append(k)
    for why, names in by_reason.items():
        _print_dropped(names, why)
    n = sum(v.numel() for v in imported.state_dict.values())
    print(f"wrote {args.out}: SIMLA {layout} checkpoint (epoch {meta['epoch']}) -> {len(imported.state_dict)} "
          f"tensors, {n / 1e6:.2f}M values, fp32; objectives: {', '.join(config['objectives'])}")
    print(f"wrote {run_yaml}: its run config with train.init_from = {args.out}; fine-tune from it with `to-finetune "
          f"{args.out} INIT.safetensors`, or point data.* at your shards and pretrain further")


def write_run_config(config: dict, weights: str) -> str:
    """OUT.yaml beside OUT.safetensors: the run config of an imported model, starting from those weights."""
    import yaml

    tree = copy.deepcopy(config)
    tree.setdefault("train", {})["init_from"] = weights
    tree["train"].pop("output_dir", None)   # runs/<config name>, not the preset's
    path = weights[: -len(".safetensors")] + ".yaml"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# written by `convert_checkpoint.py import` for {os.path.basename(weights)}\n")
        yaml.safe_dump(tree, f, sort_keys=False, width=120)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------- dall_e dVAE encoder
# OpenAI released the dVAE encoder as a whole pickled module (torch.save(model)), which weights_only=True cannot read.
# With --trust-pickle it is read by a restricted unpickler: dall_e's and torch.nn's module classes become inert stubs
# (their pickled __dict__ is kept, no code of theirs runs, dall_e is never imported) and the only callables allowed are
# torch's tensor rebuilds, torch.device and plain containers. torch.load still does the file handling (zip or legacy
# format, storages), through our module as its `pickle_module`.
_PICKLE_ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                   ("torch", "device"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")}


class _Stub:
    """Stands in for a pickled module object: keeps its state, has no behaviour."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


_STUBS: dict[tuple[str, str], type] = {}


class _Refused(pickle.UnpicklingError):
    pass


def _restricted_pickle_module():
    import _compat_pickle
    import types

    import torch

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 writes __builtin__
            if (module, name) in _PICKLE_ALLOWED:
                return getattr(torch._utils if module == "torch._utils" else __import__(module), name)
            if module == "dall_e" or module.startswith(("dall_e.", "torch.nn.modules.")):
                return _STUBS.setdefault((module, name), type(name, (_Stub,), {"__module__": "stub:" + module}))
            raise _Refused(f"refusing to unpickle {module}.{name} (only dall_e / torch.nn module "
                                         "classes, torch tensor rebuilds and plain containers are allowed)")

    def load(file, **kwargs):  # torch's legacy format reads its header records with pickle_module.load
        return Unpickler(file, **kwargs).load()

    mod = types.ModuleType("glscl_restricted_pickle")
    mod.Unpickler, mod.load = Unpickler, load
    return mod


def read_dalle_pickle(path: str) -> tuple[dict, dict]:
    """The released dall_e encoder.pkl (or a pickled state dict) -> (flat state dict, the root's pickled attributes)."""
    import warnings
    import zipfile

    import torch

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:   # torch.load would hand a TorchScript archive to torch.jit.load
            if any(n.endswith("/constants.pkl") for n in z.namelist()):
                raise UserError(f"{path}: a TorchScript archive, not a pickled dall_e encoder")
    try:
        with warnings.catch_warnings():
            # the legacy format stores each module class's source; torch warns that it cannot compare it with a stub's
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            root = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(), weights_only=False)
    except _Refused as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read as a pickled dall_e encoder ({type(e).__name__}: {first})") from None
    if isinstance(root, dict) and root and all(isinstance(k, str) and torch.is_tensor(v) for k, v in root.items()):
        return dict(root), {}
    if not isinstance(root, _Stub):
        raise UserError(f"{path}: holds a {type(root).__name__}, not a pickled dall_e Encoder module")
    sd: dict = {}

    def walk(obj, prefix):
        d = obj.__dict__
        skip = d.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, t in (d.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not torch.is_tensor(t):
                    raise UserError(f"{path}: {prefix}{name} is a {type(t).__name__}, not a tensor")
                sd[prefix + name] = t.detach().float() if t.is_floating_point() else t.detach()
        for name, child in (d.get("_modules") or {}).items():
            if child is not None:
                if not isinstance(child, _Stub):
                    raise UserError(f"{path}: {prefix}{name} is a {type(child).__name__}, not a module")
                walk(child, f"{prefix}{name}.")

    try:
        walk(root, "")
    except (TypeError, AttributeError, RecursionError) as e:   # a stub where a dict/set belongs, a cycle
        raise UserError(f"{path}: not a pickled dall_e Encoder module (malformed module state: {e})") from None
    return sd, {k: v for k, v in root.__dict__.items() if not k.startswith("_")}


def cmd_import_dvae(args) -> None:
    import re

    from models.dvae import DVAEEncoder
    from models.weights import load_strict, save_weights

    _check_out_file(args.out)
    if not args.trust_pickle:
        raise UserError(f"{args.src}: the released dall_e encoder is a whole pickled module, not loadable with "
                        "weights_only=True; pass --trust-pickle to read it with a restricted unpickler (dall_e's code "
                        "is never imported or run; only its stored tensors and sizes are read)")
    if not os.path.isfile(args.src):
        raise UserError(f"{args.src}: no such file")
    sd, attrs = read_dalle_pickle(args.src)
    for k in ("blocks.input.w", "blocks.output.conv.w"):
        if k not in sd or sd[k].dim() != 4:
            raise UserError(f"{args.src}: not a dall_e encoder (no 4-d {k!r})")
    # Sizes come from the shapes; the pickled attributes, where present, must agree with them.
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    sizes = {"hidden": sd["blocks.input.w"].shape[0], "blocks_per_group": len(blocks),
             "vocab_size": sd["blocks.output.conv.w"].shape[0], "in_channels": sd["blocks.input.w"].shape[1]}
    for ours, theirs in (("hidden", "n_hid"), ("blocks_per_group", "n_blk_per_group"), ("vocab_size", "vocab_size"),
                         ("in_channels", "input_channels")):
        if theirs in attrs and attrs[theirs] != sizes[ours]:
            raise UserError(f"{args.src}: the encoder says {theirs}={attrs[theirs]!r}, its weights say {sizes[ours]}")
    try:
        model = DVAEEncoder(**sizes)
    except ValueError as e:
        raise UserError(f"{args.src}: {e}") from None
    load_strict(model, sd, f"{args.src}: dall_e encoder weights vs DVAEEncoder{tuple(sizes.values())}")
    save_weights(sd, args.out, {"kind": "dvae", **sizes, "source": os.path.abspath(args.src),
                                "format_in": "dalle-dvae"})
    print(f"wrote {args.out}: dVAE image tokenizer, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M values, fp32; sizes: {json.dumps(sizes)}; "
          "load with models.dvae.load_dvae")


def cmd_import(args) -> None:
    if args.format == "dalle-dvae":
        return cmd_import_dvae(args)
    if args.trust_pickle:
        raise UserError("--trust-pickle is only for --format dalle-dvae (every other input loads with "
                        "weights_only=True)")
    if args.format in ("scl", "meter"):
        return cmd_import_scl(args)
    if args.format == "simla":
        return cmd_import_simla(args)
    from models.weights import (WeightsError, build_vision_tower, check_keys, hf_text_model, hf_text_to_tower,
                                infer_vit_shape, load_strict, load_weights, openai_clip_to_timm, read_hf_dir,
                                save_weights, text_config_dict, timm_vit_to_tower, tower_to_hf_text,
                                vision_config_dict)

    _check_out_file(args.out)
    fmt, k = args.format, args.drop_last_blocks
    if k < 0:
        raise UserError(f"--drop-last-blocks must be >= 0, got {k}")
    if fmt in ("hf-bert", "hf-roberta"):
        sd, hf_cfg = read_hf_dir(args.src)
        want = fmt[3:]
        if hf_cfg.get("model_type") != want:
            raise UserError(f"{args.src}/config.json: model_type is {hf_cfg.get('model_type')!r}, not {want!r} "
                            f"(use --format hf-{hf_cfg.get('model_type')})")
        tower, dropped = hf_text_to_tower(sd)
        if k:
            n = hf_cfg["num_hidden_layers"]
            if k >= n:
                raise UserError(f"--drop-last-blocks {k} leaves no layer of {n}")
            cut = sorted(x for x in tower if x.startswith("layers.") and int(x.split(".")[1]) >= n - k)
            dropped += cut
            for x in cut:
                del tower[x]
            hf_cfg = {**hf_cfg, "num_hidden_layers": n - k}
        check_keys(tower_to_hf_text(tower), hf_text_model(hf_cfg).state_dict(),
                   f"{args.src}: {fmt} weights vs a {want} model built from its config.json")
        has_tok = any(os.path.isfile(os.path.join(args.src, n)) for n in ("tokenizer.json", "vocab.txt",
                                                                             "vocab.json"))
        src = os.path.abspath(args.src)
        meta = {"kind": "text", "hf_config": hf_cfg, "text_config": text_config_dict(hf_cfg, src if not k else None),
                "tokenizer": src if has_tok else "", "dropped": dropped, "source": src, "format_in": fmt}
    else:
        sd, _ = load_weights(args.src)
        dropped = []
        if fmt == "openai-clip":
            try:
                sd, dropped, heads = openai_clip_to_timm(sd)
            except WeightsError as e:
                raise UserError(f"{args.src}: {e}") from None
            timm_name = args.timm_name or "vit_base_patch16_clip_quickgelu_224"
            num_heads = args.num_heads or heads
        else:
            if not args.timm_name:
                raise UserError("import --format timm-vit needs --timm-name: the timm architecture of these weights "
                                "(e.g. vit_base_patch16_224, deit_small_patch16_224)")
            timm_name, num_heads = args.timm_name, args.num_heads
        try:
            shape = infer_vit_shape(sd, args.src)
            tower, more = timm_vit_to_tower(sd, shape["depth"], k, args.max_frames, args.image_size)
        except WeightsError as e:
            raise UserError(f"{args.src}: {e}") from None
        dropped += more
        vcfg = vision_config_dict(timm_name, shape, num_heads, args.image_size or shape["grid"] * shape["patch_size"],
                                  k, args.max_frames)
        try:
            encoder = build_vision_tower(vcfg)
        except ValueError as e:
            raise UserError(f"--timm-name {timm_name}: {e}") from None
        load_strict(encoder, tower, f"{args.src}: {fmt} weights vs our vision tower ({timm_name})")
        meta = {"kind": "vision", "vision_config": vcfg, "dropped": dropped, "source": os.path.abspath(args.src),
                "format_in": fmt}
    save_weights(tower, args.out, meta)
    _print_dropped(meta["dropped"], "not part of our tower")
    cfg = meta.get("vision_config") or meta.get("text_config")
    print(f"wrote {args.out}: {meta['kind']} tower, {len(tower)} tensors; tower config: {json.dumps(cfg)}")


def cmd_export_scl(args) -> None:
    """A whole-model file (or DeepSpeed dir) -> the official SCL layout, Lightning 1.x-shaped."""
    from train import scl_format

    if not args.out_dir.endswith((".ckpt", ".pt", ".pth")):
        raise UserError(f"{args.out_dir}: the output is a Lightning checkpoint; name it *.ckpt")
    sd, meta = load_input(args.input)
    if meta.get("kind") != "vlp":
        raise UserError(f"{args.input}: kind is {meta.get('kind')!r}; export --format scl needs a whole model (vlp)")
    try:
        skipped = scl_format.export_checkpoint(sd, meta, args.out_dir)
    except scl_format.SclFormatError as e:
        raise UserError(f"{args.input}: {e}") from None
    if skipped:
        print(f"not written ({len(skipped)}: no place in the official layout, or an all-zero temporal_embed): "
              + ", ".join(skipped[:12]) + (f", ... ({len(skipped) - 12} more)" if len(skipped) > 12 else ""))
    print("not written either (the official model keeps its own init for them; nothing in SCL reads them): the MAE "
          "decoder, text_transformer.pooler.*, text_transformer.embeddings.position_ids")
    print(f"wrote {args.out_dir}: official SCL layout; the official code loads it with load_path={args.out_dir} "
          "(strict=False), or torch.load(weights_only=True)")


def cmd_export(args) -> None:
    if args.format == "scl":
        return cmd_export_scl(args)
    from models.weights import export_text_hf, export_vision_timm, split_prefix

    sd, meta = load_input(args.input)
    kind, tower = meta["kind"], args.tower
    if kind == "vlp":
        config = meta["config"]
        tower_sd = split_prefix(sd, tower + ".")
        if not tower_sd:
            raise UserError(f"{args.input}: no {tower}.* tensors")
        vision_cfg = config["model"]["vision"]
        text_cfg = config["model"]["text"]
        hf_cfg = meta.get("text_hf_config")
        from datasets.transforms import MEAN_STD  # the run's pixel normalisation goes into the export's config
        norm = MEAN_STD.get((config.get("data") or {}).get("normalize"))
    elif kind == tower:
        tower_sd, vision_cfg, norm = sd, meta.get("vision_config"), None
        hf_cfg, text_cfg = meta.get("hf_config"), meta.get("text_config")
    else:
        raise UserError(f"{args.input}: holds a {kind} tower, not {tower!r} (--tower {kind})")
    if tower == "vision":
        dropped = export_vision_timm(tower_sd, vision_cfg, args.out_dir, norm)
        _print_dropped(dropped, "timm ViTs have no temporal axis")
        print(f"wrote {args.out_dir}: timm {vision_cfg['timm_name']}; load with "
              f"timm.create_model('local-dir:{args.out_dir}', pretrained=True)")
        return
    hf_cfg = hf_cfg or text_hf_config(text_cfg)
    if not hf_cfg:
        raise UserError(f"{args.input}: the text tower's transformers config is not recorded and "
                        f"model.text.pretrained={text_cfg.get('pretrained')!r} is not available here")
    tokenizer = _tokenizer_dir(meta if kind == "text" else None, text_cfg if kind == "vlp" else None)
    export_text_hf(tower_sd, hf_cfg, args.out_dir, tokenizer)
    print(f"wrote {args.out_dir}: transformers {(hf_cfg or {}).get('model_type', 'bert')} model"
          f"{' + tokenizer' if tokenizer else ' (no tokenizer: none recorded)'}; load with "
          f"AutoModel.from_pretrained('{args.out_dir}', add_pooling_layer=False) (our tower has no pooler)")


def _tokenizer_dir(meta, text_cfg) -> str | None:
    from models.text import resolve_path

    name = (meta or {}).get("tokenizer") or ((text_cfg or {}).get("tokenizer") or (text_cfg or {}).get("pretrained"))
    if not name:
        return None
    try:
        return resolve_path(name)
    except (FileNotFoundError, ImportError):
        print(f"note: tokenizer {name!r} is not available here; exported without tokenizer files")
        return None


def cmd_info(args) -> None:
    sd, meta = load_input(args.input)
    n = sum(v.numel() for v in sd.values())
    print(f"{args.input}: kind {meta.get('kind')}, {len(sd)} tensors, {n / 1e6:.2f}M values")
    for k in ("source", "zero_stage", "step", "stage", "format_in", "hidden", "blocks_per_group", "vocab_size"):
        if k in meta:
            print(f"  {k}: {meta[k]}")
    if meta.get("dropped"):
        print(f"  dropped: {len(meta['dropped'])} tensors")
    if meta.get("new"):
        print(f"  new (not in the source): {', '.join(meta['new'])}")
    if "config" in meta:
        import yaml

        print(yaml.safe_dump({"model": meta["config"]["model"], "objectives": meta["config"].get("objectives")},
                             sort_keys=False).rstrip())
    for k in ("vision_config", "text_config"):
        if k in meta:
            print(f"  {k}: {json.dumps(meta[k])}")


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train/convert_checkpoint.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    z = sub.add_parser("zero-to-fp32", help="DeepSpeed ZeRO checkpoint -> one fp32 safetensors file")
    z.add_argument("ckpt", help="run dir, its checkpoints/ dir (uses `latest`) or a checkpoints/step_N dir")
    z.add_argument("out", help="output .safetensors")
    z.add_argument("--no-verify", action="store_true", help="skip the strict key check against a freshly built model")
    z.set_defaults(fn=cmd_zero_to_fp32)

    f = sub.add_parser("to-finetune", help="pretraining checkpoint -> fine-tuning init")
    f.add_argument("input", help="a file from zero-to-fp32, or a DeepSpeed checkpoint dir")
    f.add_argument("output", help="output .safetensors")
    f.add_argument("--image-size", type=int, help="resample the position embedding to this resolution (pixels)")
    f.add_argument("--num-frames", type=int, help="resize the temporal embedding for this many frames")
    f.add_argument("--trained-frames", type=int,
                   help="frames per video in pretraining (default: the run config's data.num_frames)")
    f.add_argument("--drop", action="append", default=[], metavar="PREFIX",
                   help="also drop parameters under this prefix (always dropped: what the objectives declare pretraining-only "
                        "and the momentum copies)")
    f.add_argument("--no-verify", action="store_true", help="skip the strict key check against a freshly built model")
    f.set_defaults(fn=cmd_to_finetune)

    i = sub.add_parser("import", help="public weights -> one of our towers, or an SCL/GLSCL/METER checkpoint -> "
                                      "a whole model")
    i.add_argument("--format", required=True,
                   choices=["hf-bert", "hf-roberta", "timm-vit", "openai-clip", "scl", "meter", "dalle-dvae", "simla"],
                   help="scl: the released SCL/GLSCL (or METER, recognised by its keys) Lightning checkpoints; "
                        "meter: the same, insisting on METER's layout; dalle-dvae: OpenAI's DALL-E dVAE encoder.pkl "
                        "(SIMLA's image tokenizer; needs --trust-pickle); simla: the released SIMLA pretraining / "
                        "COCO-retrieval checkpoints")
    i.add_argument("src", help="transformers model dir (hf-*), a state dict file .pth/.bin/.safetensors, an "
                               "official .ckpt (scl, meter) / .pth (simla), or dall_e's encoder.pkl (dalle-dvae)")
    i.add_argument("out", help="output .safetensors")
    i.add_argument("--drop-last-blocks", type=int, default=0, help="drop the last K transformer blocks/layers")
    i.add_argument("--timm-name", help="timm architecture of the weights (timm-vit: required; openai-clip: default "
                                        "vit_base_patch16_clip_quickgelu_224, sizes are taken from the weights)")
    i.add_argument("--num-heads", type=int, help="attention heads (default: the timm model's; openai-clip: width/64)")
    i.add_argument("--image-size", type=int, help="resample the position embedding to this resolution (pixels)")
    i.add_argument("--max-frames", type=int, default=8, help="rows of the new temporal embedding (zeros)")
    i.add_argument("--config", help="scl/meter: the run config to start from (default: glscl_4m.yaml, or scl_4m.yaml "
                                    "for a file without MLTC's mask token); simla: default simla_4m.yaml; sizes and "
                                    "objectives follow the file")
    i.add_argument("--tokenizer", help="scl/meter: a local roberta-base tokenizer directory (default: the config's "
                                       "model.text.tokenizer/pretrained); simla: a local bert-base-uncased tokenizer "
                                       "directory or 'minilm' (default: minilm, the same uncased vocabulary); "
                                       "nothing is downloaded")
    i.add_argument("--trust-pickle", action="store_true",
                   help="dalle-dvae: read the pickled module with a restricted unpickler (stubs for its classes, only "
                        "torch tensor rebuilds run)")
    i.set_defaults(fn=cmd_import)

    e = sub.add_parser("export", help="one of our towers -> timm / transformers, or a whole model -> the official "
                                      "SCL checkpoint layout")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--tower", choices=["vision", "text"])
    what.add_argument("--format", choices=["scl"], help="scl: the released SCL/GLSCL layout, Lightning 1.x-shaped")
    e.add_argument("input", help="a file this tool wrote (vlp or tower), or a DeepSpeed checkpoint dir")
    e.add_argument("out_dir", metavar="out", help="new output directory (--tower), or OUT.ckpt (--format scl)")
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("info", help="what a file written by this tool holds")
    s.add_argument("input")
    s.set_defaults(fn=cmd_info)
    return p


def main(argv=None) -> int:
    from models.weights import WeightsError

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        args.fn(args)
    except (UserError, WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
