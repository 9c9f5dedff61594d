"""Weight files and key mappings between our towers and public formats.

Our towers keep public key names wherever they can, so most mappings are renames:
  vision tower (VisionEncoder)  = a timm ViT's patch_embed/cls_token/pos_embed/norm_pre/blocks/norm + our
                                  `temporal_embed` (1, max_frames, D); timm's head/fc_norm are not part of it.
  text tower (TextEncoder)      = a transformers BERT/RoBERTa's `embeddings.*` + `encoder.layer.N.*` stored as
                                  `layers.N.*`; the pooler (and any MLM head) is not part of it.
  OpenAI CLIP ViT               = visual.conv1/class_embedding/positional_embedding/ln_pre/transformer.resblocks.N
                                  (attn.in_proj_* = timm's fused qkv, same q|k|v order)/ln_post; `visual.proj` (the
                                  image-text projection) and the whole text side are dropped, by name (the renames
                                  are timm's own CLIP converter's). CLIP blocks use
                                  QuickGELU and LayerNorm eps 1e-5, so the tower must be built from a timm
                                  `*_clip_quickgelu_*` model (model.vision.timm_name), which the import records.

Every function here is pure (no DeepSpeed, no run config): it maps state dicts and tower configs. Loads are strict:
a mismatch raises WeightsError naming the missing/unexpected keys. Files are written atomically (tmp + rename).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Optional

import torch
import torch.nn.functional as F

FORMAT = "glscl-weights-v1"  # metadata["format"] of every file we write


class WeightsError(ValueError):
    """A bad weights file or a key mismatch; the message is one line naming the file/key."""


# --------------------------------------------------------------------------------------------------- file I/O
def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    # Training scripts often save {"model": sd} / {"state_dict": sd}; DDP adds a "module." prefix.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise WeightsError(f"{path}: not a state dict: {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (state dict, metadata) of a .safetensors file, or of a torch file read with weights_only=True."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: cannot read as a torch state dict with weights_only=True ({first[:300]})") from None
    return _unwrap(obj, path), {}


def save_weights(state_dict: dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    """Atomic safetensors write; metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    # safetensors refuses tensors that share storage (views); our tensors are small enough to copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_dir(tmp_dir: str, out_dir: str) -> None:
    """Move a fully written tmp dir to out_dir (which must not exist or be empty): readers never see half a dir."""
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp_dir, out_dir)


def make_tmp_dir(out_dir: str) -> str:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise WeightsError(f"{out_dir}: already exists and is not an empty directory; choose a new output dir")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


# --------------------------------------------------------------------------------------------------- strict checks
def check_keys(state_dict: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    """Same key set and shapes as `reference` (a module's state_dict), else one error naming the differences."""
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs expected {tuple(reference[k].shape)}"
              for k in sorted(set(state_dict) & set(reference)) if state_dict[k].shape != reference[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_few(shapes)}")
        raise WeightsError(f"{what}: " + "; ".join(parts))


def _few(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{f', ... {len(names) - n} more' if len(names) > n else ''}] ({len(names)})"


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    check_keys(state_dict, module.state_dict(), what)
    module.load_state_dict(state_dict, strict=True)


def split_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` ('vision.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------- resizing
def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + H*W, D) -> (1, 1 + H'*W', D): bicubic on the patch grid (timm's resampler), class token untouched.
    The same grid returns the input tensor itself."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    if pos_embed.shape[1] != 1 + old_grid[0] * old_grid[1]:
        raise WeightsError(f"pos_embed has {pos_embed.shape[1]} rows, expected 1 + {old_grid[0]}x{old_grid[1]}")
    out = resample_abs_pos_embed(pos_embed.float(), new_size=list(new_grid), old_size=list(old_grid),
                                 num_prefix_tokens=1)
    return out.to(pos_embed.dtype)


def resize_temporal_embed(table: torch.Tensor, num_frames: int, trained_frames: int) -> torch.Tensor:
    """(1, T_max, D) temporal table -> the table for a model that sees `num_frames` frames.

    Only the first `trained_frames` rows were ever used in training (images skip the table). Videos are sampled
    uniformly over the clip, so frame i of F sits at relative time i/(F-1): the trained rows are linearly
    interpolated over time to `num_frames` rows (endpoints kept). When nothing was trained on video (trained_frames
    <= 1) there is no time signal to stretch: existing rows are kept and new rows start at zero (no offset).
    Unchanged (the same tensor) when num_frames == trained_frames, or num_frames <= T_max without video training.
    """
    if table.dim() != 3 or table.shape[0] != 1:
        raise WeightsError(f"temporal_embed must be (1, frames, D), got {tuple(table.shape)}")
    if num_frames < 1:
        raise WeightsError(f"num_frames must be >= 1, got {num_frames}")
    t_max = table.shape[1]
    if trained_frames <= 1:
        if num_frames <= t_max:
            return table
        return torch.cat([table, table.new_zeros(1, num_frames - t_max, table.shape[2])], dim=1)
    if trained_frames > t_max:
        raise WeightsError(f"trained_frames={trained_frames} but the temporal table has only {t_max} rows")
    if num_frames == trained_frames:
        return table
    used = table[:, :trained_frames].float().transpose(1, 2)  # (1, D, T)
    out = F.interpolate(used, size=num_frames, mode="linear", align_corners=True).transpose(1, 2)
    return out.to(table.dtype).contiguous()


# --------------------------------------------------------------------------------------------------- vision
def infer_vit_shape(sd: dict[str, torch.Tensor], what: str) -> dict:
    """Sizes readable from timm-keyed ViT weights (num_heads is not: it does not change any shape)."""
    for k in ("dist_token", "reg_token"):
        if k in sd:
            raise WeightsError(f"{what}: has {k!r} (distilled DeiT / register tokens); our tower has exactly one "
                               "class token")
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if k not in sd:
            raise WeightsError(f"{what}: not a timm ViT state dict (no {k!r})")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise WeightsError(f"{what}: patch_embed.proj.weight {tuple(w.shape)} is not a square conv patch embedding")
    dim = sd["cls_token"].shape[-1]
    rows = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise WeightsError(f"{what}: pos_embed has {rows} patch rows, not a square grid (class token missing?)")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return {"patch_size": int(w.shape[-1]), "embed_dim": int(dim), "depth": depth, "grid": grid,
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim}


def timm_vit_to_tower(sd: dict[str, torch.Tensor], depth: int, drop_last_blocks: int, max_frames: int,
                      img_size: Optional[int] = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm ViT/DeiT keys -> our vision tower's keys. -> (tower state dict, dropped key names).

    Drops, by name: the classifier (head.*, fc_norm.*) and the last `drop_last_blocks` blocks. pos_embed is
    resampled when img_size differs from the weights' grid; temporal_embed is new (zeros: no time offset yet).
    """
    sd = dict(sd)
    shape = infer_vit_shape(sd, "timm weights")
    dropped = sorted(k for k in sd if k.split(".")[0] in ("head", "fc_norm"))
    keep = depth - drop_last_blocks
    if keep < 1:
        raise WeightsError(f"--drop-last-blocks {drop_last_blocks} leaves no block of {depth}")
    dropped += sorted((k for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= keep),
                      key=lambda k: (int(k.split(".")[1]), k))
    for k in dropped:
        del sd[k]
    if img_size is not None:
        if img_size % shape["patch_size"]:
            raise WeightsError(f"img_size {img_size} is not a multiple of the patch size {shape['patch_size']}")
        g = img_size // shape["patch_size"]
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (g, g), (shape["grid"], shape["grid"]))
    sd["temporal_embed"] = torch.zeros(1, max_frames, shape["embed_dim"], dtype=sd["cls_token"].dtype)
    return sd, dropped


# What timm's VisionTransformer holds of an OpenAI CLIP visual tower (the key set our vision tower loads).
_CLIP_AS_TIMM = re.compile(r"patch_embed\.proj\.weight|cls_token|pos_embed|norm_pre\.(weight|bias)|norm\.(weight|bias)"
                           r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")


def openai_clip_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """OpenAI CLIP (ViT) state dict -> timm ViT keys. -> (timm state dict, dropped names, num_heads).

    Accepts a full CLIP model (visual.* + text side) or the visual module alone. Dropped by name: the text side and
    visual.proj. num_heads follows OpenAI's rule width // 64 (CLIP's build_model). The renames and reshapes are
    timm's own converter's (`_convert_openai_clip`, a private function timm's checkpoint_filter_fn applies to CLIP
    weights; for every key our tower loads it gave the same keys and tensors as our former hand-written mapping,
    checked on synthetic OpenAI-layout and open_clip state dicts when we switched; tests/models/test_weights.py
    checks the forward against reference CLIP towers). Around it we keep what it does not do: refuse ResNet CLIPs,
    name what is dropped (timm skips the text side silently and turns visual.proj into a classifier head) and refuse
    keys a timm ViT does not hold (timm passes them through renamed), naming the source key.
    """
    from timm.models.vision_transformer import _convert_openai_clip

    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    if prefix + "attnpool.c_proj.weight" in sd or prefix + "layer1.0.conv1.weight" in sd:
        raise WeightsError("OpenAI CLIP ResNet weights: only the ViT variants are supported")
    needed = [prefix + n for n in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                                   "ln_post.weight")]
    absent = [n for n in needed if n not in sd]
    if absent:
        raise WeightsError(f"not an OpenAI CLIP ViT state dict: no {absent[0]!r}")
    dropped = sorted(k for k in sd if not k.startswith(prefix) or k == prefix + "proj")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k in dropped:
            continue
        # one key at a time, so that a key timm's ViT does not hold is reported under its CLIP name
        ((name, tensor),) = _convert_openai_clip({k: v}, None, prefix=prefix).items()
        if _CLIP_AS_TIMM.fullmatch(name):
            out[name] = tensor
        else:
            unknown.append(k)
    if unknown:
        raise WeightsError(f"OpenAI CLIP weights: unexpected {_few(sorted(unknown))}")
    return out, dropped, out["cls_token"].shape[-1] // 64


def vision_config_dict(timm_name: str, shape: dict, num_heads: Optional[int], img_size: int,
                       drop_last_blocks: int, max_frames: int) -> dict:
    """A models.vision.VisionConfig as a plain dict, for file metadata and run configs."""
    from models.vision import VisionConfig

    cfg = VisionConfig(timm_name=timm_name, img_size=img_size, patch_size=shape["patch_size"],
                       embed_dim=shape["embed_dim"], depth=shape["depth"], num_heads=num_heads,
                       mlp_ratio=shape["mlp_ratio"], drop_last_blocks=drop_last_blocks, max_frames=max_frames)
    return dataclasses.asdict(cfg)


def build_vision_tower(cfg: dict):
    from models.vision import VisionConfig, VisionEncoder

    known = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionEncoder(VisionConfig(**{k: v for k, v in cfg.items() if k in known}))


def export_vision_timm(tower_sd: dict[str, torch.Tensor], cfg: dict, out_dir: str,
                       mean_std: Optional[tuple] = None) -> list[str]:
    """Our vision tower -> a timm model dir (config.json + model.safetensors, timm's own export format).

    Load it with `timm.create_model("local-dir:OUT_DIR", pretrained=True)`, or build `config.json`'s architecture
    with its model_args and load_state_dict(model.safetensors). The timm model has depth = the blocks we kept and
    no classifier (num_classes=0). Dropped by name: temporal_embed (timm ViTs have no time axis).
    -> dropped names.
    """
    import timm
    from timm.models import save_for_hf

    sd = dict(tower_sd)
    dropped = [k for k in ("temporal_embed",) if k in sd]
    for k in dropped:
        del sd[k]
    kept = cfg["depth"] - cfg.get("drop_last_blocks", 0) if cfg.get("depth") is not None else None
    args = {k: cfg[k] for k in ("patch_size", "embed_dim", "num_heads", "mlp_ratio") if cfg.get(k) is not None}
    if kept is not None:
        args["depth"] = kept
    elif cfg.get("drop_last_blocks"):
        # depth came from the timm default; the kept count is what the weights hold
        args["depth"] = infer_vit_shape(sd, "vision tower")["depth"]
    model = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, img_size=cfg["img_size"], **args)
    load_strict(model, sd, f"timm {cfg['timm_name']} from our vision tower")
    data_config = {"mean": tuple(mean_std[0]), "std": tuple(mean_std[1])} if mean_std else None
    tmp = make_tmp_dir(out_dir)
    # The tag names where the weights come from (the timm default would name a timm pretraining tag).
    save_for_hf(model, tmp, model_config={"pretrained_cfg": {"tag": "glscl"}}, safe_serialization=True,
                data_config=data_config)
    publish_dir(tmp, out_dir)
    return dropped


# --------------------------------------------------------------------------------------------------- text
HF_TEXT_DROP = ("pooler.", "cls.", "lm_head.")  # not part of our text tower: the pooler and MLM heads


def hf_text_to_tower(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers BERT/RoBERTa keys (BertModel, or *ForMaskedLM with a bert./roberta. prefix) -> our text tower.
    -> (tower state dict, dropped names: pooler.*, cls.*, lm_head.*, the legacy position_ids buffer)."""
    out, dropped = {}, []
    for k, v in sd.items():
        name = k
        for p in ("bert.", "roberta."):
            if name.startswith(p):
                name = name[len(p):]
                break
        if name.startswith(HF_TEXT_DROP) or name in ("embeddings.position_ids", "embeddings.token_type_ids"):
            dropped.append(k)
        elif name.startswith("encoder.layer."):
            out["layers." + name[len("encoder.layer."):]] = v
        else:
            out[name] = v  # embeddings.*; anything else is reported by the strict check
    return out, sorted(dropped)


def tower_to_hf_text(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("encoder.layer." + k[len("layers."):] if k.startswith("layers.") else k): v for k, v in sd.items()}


def read_hf_dir(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict, config.json) of a transformers model directory, without building the model."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: not a directory (expected a transformers model dir with config.json)")
    if not os.path.isfile(cfg_path):
        raise WeightsError(f"{path}: no config.json (expected a transformers model dir)")
    with open(cfg_path) as f:
        config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return load_weights(os.path.join(path, name))[0], config
    index = [n for n in os.listdir(path) if n.endswith(".index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_weights(os.path.join(path, name))[0])
        return sd, config
    raise WeightsError(f"{path}: no model.safetensors, pytorch_model.bin or sharded index")


def hf_text_model(config: dict, with_pooler: bool = False):
    """A random-init transformers model for a config.json dict (the strict reference for key names/shapes)."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type not in ("bert", "roberta"):
        raise WeightsError(f"config.json model_type is {model_type!r}; the text tower supports 'bert' and 'roberta'")
    for k in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    return AutoModel.from_config(hf_cfg, add_pooling_layer=with_pooler, attn_implementation="sdpa")


def text_config_dict(config: dict, pretrained: Optional[str] = None) -> dict:
    """The models.text.TextConfig fields that match a transformers config.json (for metadata / run configs)."""
    extra = 2 if config.get("model_type") == "roberta" else 0  # RoBERTa's table has padding_idx + 1 extra rows
    return {"pretrained": pretrained, "tokenizer": pretrained, "arch": config.get("model_type", "bert"),
            "hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
            "num_heads": config["num_attention_heads"], "intermediate_size": config["intermediate_size"],
            "vocab_size": config["vocab_size"],
            "max_position_embeddings": config["max_position_embeddings"] - extra,
            "dropout": config.get("hidden_dropout_prob", 0.1),
            "type_vocab_size": config.get("type_vocab_size"), "layer_norm_eps": config.get("layer_norm_eps")}


def export_text_hf(tower_sd: dict[str, torch.Tensor], config: dict, out_dir: str, tokenizer_dir: Optional[str] = None
                   ) -> list[str]:
    """Our text tower -> a transformers model dir (config.json + model.safetensors [+ tokenizer files]).

    `AutoModel.from_pretrained(OUT_DIR)` gives the same last_hidden_state. Our tower has no pooler: transformers
    initialises `pooler.*` fresh (reported as newly initialised) unless loaded with add_pooling_layer=False.
    -> names the export could not provide (the pooler's).
    """
    model = hf_text_model(config, with_pooler=False)
    load_strict(model, tower_to_hf_text(tower_sd), "transformers text model from our text tower")
    tmp = make_tmp_dir(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(tmp)
    publish_dir(tmp, out_dir)
    return ["pooler.dense.weight", "pooler.dense.bias"]
