"""The released SIMLA checkpoints (codezakh/SIMLA @44c700d: the 4M pretraining file and the COCO-retrieval file) ->
our single-stream VLPModel (`model.family: single_stream`). Used by `train/convert_checkpoint.py import --format simla`.

Their layout is recorded in shared/reference/simla_checkpoint/ (README.md, the two .tsv manifests). Key for key:

  official                                              ours
  visual_encoder.*  (timm ViT-B/16, mask_token          vision.*  (same names; mask_token kept, and
     in the pretraining file)                              model.vision.mask_token is true iff the file has it)
  text_encoder.bert.* (pretraining, BertForMaskedLM)    text.*
  / text_encoder.*    (retrieval, BertModel):
     embeddings.{word,position}_embeddings, LayerNorm      embeddings.* (same names; no token types on either side)
     encoder.layer.i.{attention.*, crossattention.*,       layers.i.*   (same sub-names)
        intermediate.dense, output.*}
  text_encoder.cls.predictions.{transform.dense,        objectives.xmm_text.head.{transform.dense,
     transform.LayerNorm, decoder.weight, decoder.bias}    transform.LayerNorm, decoder.weight, decoder.bias}
  vision_proj, text_proj [256, 768]                     itc.image_proj, itc.text_proj (model.itc.projection: linear)
  temp (0-d)                                            itc.log_inv_temperature [1] = log(1 / temp)
  itm_head                                              itm_head
  mim_head [8192, 768]                                  objectives.xmm_image.head
  concept_head [30522, 256]                             objectives.psl.concept_head
  <module>_m.* (momentum copies)                        momentum.copies.{vision, text, itc,
                                                           objectives__xmm_text__head, objectives__xmm_image__head,
                                                           objectives__psl__concept_head}.*
  image_queue, text_queue [256, 65536]                  objectives.ita.{image,text}_queue.features [65536, 256]
                                                           (TRANSPOSED: ours holds one feature per row)
  queue_ptr [1]                                         objectives.ita.image_queue.ptr AND text_queue.ptr (one
                                                           pointer in the file, one per queue here)

Dropped, by name (printed with the reason):
  text_encoder{,_m}[.bert].embeddings.position_ids   the int64 buffer 0..511 BERT keeps; ours computes positions
  text_encoder{,_m}.cls.predictions.bias             the same tensor as cls.predictions.decoder.bias (BERT ties
                                                     them; both keys are saved). Checked equal, else an error
  idx_queue                                          the retrieval file's image-id queue (ALBEF's id positives for
                                                     fine-tuning); our ITA keeps no id queue
Checked rather than dropped: cls.predictions.decoder.weight must equal the word-embedding table (online and momentum
alike), since our MLM head's decoder IS that table (objectives.xmm_text.tie_decoder: true); a file where they differ
is refused. Optimizer, lr_scheduler and epoch are not carried (our engine starts its own).

New (not in the file; listed in the output's `new` metadata):
  vision.temporal_embed                  our video table: our init (N(0, temporal_init_std^2), seeded). Images never
                                         read it (model.vision.temporal_embed_images: false)
  momentum.copies.vision.temporal_embed  a copy of the above, as a fresh build makes it
  momentum.copies.itc.log_inv_temperature  a copy of the imported temperature: SIMLA's momentum model shares `temp`

The model the file is mapped onto is built from a run config whose every size comes from the file's shapes: vision
`vit_base_patch16_224`-shaped (width, depth, patch, MLP ratio, img_size from pos_embed's grid: 256 pretraining, 384
retrieval), text a random-init BERT (`pretrained: null`; hidden, layers, FFN, vocabulary, positions from the
tensors; LayerNorm eps 1e-12), and heads width/64 for both (not recorded in the weights; 12 for ViT-B and bert-base).
The tokenizer defaults to `minilm`: all-MiniLM-L6-v2 ships bert-base-uncased's 30,522-token uncased vocabulary
(--tokenizer DIR for a local bert-base-uncased; its length must equal the file's vocabulary). model.itc: linear
projections of the file's width, log parameterization clamped to [0.001, 0.5] as SIMLA clamps `temp`. Everything
else (data, train, objective settings) comes from train/configs/simla_4m.yaml or --config; `alpha`, `momentum` and
`mlm_probability` from the file's own config where it has them.

Objectives follow the layout: pretraining -> ita (queue size from the file), itm, xmm_text, xmm_image, psl;
retrieval -> ita, itm. The DALL-E dVAE (xmm_image's image tokenizer) is never in a checkpoint, so the written config
names the preset's path `objectives.xmm_image.tokenizer: pretrained/dalle_dvae.safetensors` (or --config's), which
the user writes with `import --format dalle-dvae` before pretraining further; until then a build of the full
pretraining model fails loudly on that path (a random stand-in tokenizer would silently retrain the imported MIM
head toward meaningless codes). The weights do not depend on it: the MIM head's size comes from mim_head's rows (the
dVAE's vocabulary, 8192), and `to-finetune` drops xmm_image before building anything.

Where the official loaders differ (shared/reference/simla_checkpoint/load_simulations.json):
  * Retrieval.py / Grounding / VE load the pretraining file with strict=False after stripping `bert.`: the 24 keys
    of mim_head*, concept_head*, the mask tokens and the MLM heads are dropped as unexpected, and idx_queue keeps its
    -100 init, while the queues, queue_ptr and momentum encoders come from the file. Here `to-finetune` drops by name
    what pretraining alone uses (the xmm_text / xmm_image / psl heads, ITA's queues and every momentum copy: a task
    re-copies momentum encoders from the online weights) and keeps vision.mask_token unless the fine-tune config sets
    model.vision.mask_token: false (then --init lists it as dropped).
  * They bicubic-interpolate pos_embed of visual_encoder AND visual_encoder_m on every load; here import keeps the
    file's grid, and `to-finetune --image-size` / fine-tuning's --init resample it (timm's bicubic, CLS row kept).
  * zero_shot_retrieval.py loads the COCO file strict=True; Pretrain.py --checkpoint loads the pretraining file
    strict=True (and resumes its optimizer): here both are whole models, minus the dropped keys above.
  * VQA copies text-encoder layers 6-11 into a 6-layer answer decoder, NLVR2 duplicates layers: not done here.

Reading: the file is `{'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'}`. A file that torch.load reads with
weights_only=True (the retrieval file: its config is a plain dict) is read so. The pretraining file's config is an
OmegaConf DictConfig, which weights_only refuses; it is then read by `RestrictedUnpickler`: real callables are only
torch's tensor rebuild functions (storages are torch.load's own) and collections.OrderedDict; the globals an OmegaConf
pickle names are inert stubs that keep what the pickle hands them and run nothing: omegaconf.*, typing.* (Any, ...),
and the type references its metadata holds (builtins dict / list / int / float / str / bool / tuple / set, and
collections.defaultdict for its resolver cache: a real omegaconf 2.1 pickle names all of these). Any other global
(os.system, builtins.eval, ...) is refused before it is called: one line, exit 2.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copy
import math
import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from models.momentum import online_key
from models.weights import WeightsError
from train.scl_format import Stub

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO_ROOT, "train", "configs", "simla_4m.yaml")
DVAE_PLACEHOLDER = "pretrained/dalle_dvae.safetensors"   # simla_4m.yaml's; `import --format dalle-dvae` writes it
TIMM_NAME = "vit_base_patch16_224"
TEMPERATURE_RANGE = (0.001, 0.5)   # SIMLA clamps temp to this every step
TEXT_PREFIX = {"pretrain": "text_encoder.bert.", "retrieval": "text_encoder."}
OBJECTIVES = {"pretrain": ("ita", "itm", "xmm_text", "xmm_image", "psl"), "retrieval": ("ita", "itm")}
# our submodules with a momentum copy in a SIMLA model (models/momentum.py: momentum.copies.<name with __>.*)
MOMENTUM_COPIES = ("vision", "text", "itc", "objectives.xmm_text.head", "objectives.xmm_image.head",
                   "objectives.psl.concept_head")
# our keys no official file holds (see the docstring)
NEW = ("vision.temporal_embed", "momentum.copies.vision.temporal_embed", "momentum.copies.itc.log_inv_temperature")
TEMPERATURE, QUEUES, QUEUE_PTR = "temp", {"image_queue": "image_queue", "text_queue": "text_queue"}, "queue_ptr"


class SimlaFormatError(WeightsError):
    """Bad input or a layout mismatch; one line naming the file and the key (convert_checkpoint: exit 2)."""


# ============================================================================================ restricted unpickling
def _torch_rebuilds() -> dict:
    from torch import _utils

    names = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
    return {("torch._utils", n): getattr(_utils, n) for n in names if hasattr(_utils, n)}


_REAL = {**_torch_rebuilds(), ("collections", "OrderedDict"): collections.OrderedDict}
# type references inside OmegaConf's node metadata (object_type, key_type, element_type) and its resolver cache
_STUBBED_NAMES = {("builtins", n) for n in ("dict", "list", "int", "float", "str", "bool", "tuple", "set",
                                            "frozenset", "bytes", "object")} | {("collections", "defaultdict")}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """find_class: torch's tensor rebuilds and OrderedDict are real; omegaconf.*, typing.* and the few type names an
    OmegaConf pickle holds become inert Stub subclasses; everything else is refused (RefusedGlobal)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        # protocol 2 (torch.save's) spells Python 2 names (__builtin__.long, ...): mapped as pickle's fix_imports
        # does, and the result checked like any other name
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _REAL:
            return _REAL[key]
        if module == "omegaconf" or module.startswith("omegaconf.") or module == "typing" or key in _STUBBED_NAMES:
            if key not in self.stubs:
                self.stubs[key] = type(str(name), (Stub,), {"stub_of": f"{module}.{name}", "__module__": "stub"})
            return self.stubs[key]
        raise RefusedGlobal(f"the pickle names {module}.{name}")


_PICKLE_MODULE = types.ModuleType("glscl_simla_restricted_pickle")
_PICKLE_MODULE.Unpickler = RestrictedUnpickler
_PICKLE_MODULE.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()


def read_checkpoint(path: str) -> dict:
    """-> the file's top-level dict: torch.load(weights_only=True), else (a pickled OmegaConf config) through
    RestrictedUnpickler. Tensor data of zip files is memory-mapped."""
    if not os.path.isfile(path):
        raise SimlaFormatError(f"{path}: no such file")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        # torch.load would hand a TorchScript archive to torch.jit.load (which runs its code): refuse it first
        if any(n.endswith("constants.pkl") for n in names) or not any(n.endswith("data.pkl") for n in names):
            raise SimlaFormatError(f"{path}: a zip archive but not a torch.save checkpoint (no data.pkl, or "
                                   "TorchScript)")
    else:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise SimlaFormatError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:   # weights_only refused a global (OmegaConf's): the restricted reader decides
        try:
            obj = torch.load(path, map_location="cpu", pickle_module=_PICKLE_MODULE, weights_only=False,
                             mmap=is_zip)
        except RefusedGlobal as e:
            raise SimlaFormatError(f"{path}: refused: {e}; a SIMLA checkpoint never needs it, so the file was not "
                                   "read") from None
        except Exception as e:   # noqa: BLE001 - a corrupt pickle raises many types
            raise SimlaFormatError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:   # noqa: BLE001
        raise SimlaFormatError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise SimlaFormatError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def plain_config(obj, depth: int = 0):
    """The file's `config` as plain data: a dict as is; a stubbed OmegaConf DictConfig / ListConfig / value node ->
    dict / list / value (best effort: anything unreadable becomes None)."""
    if depth > 64:
        return None
    if isinstance(obj, Stub):
        state = obj.state if isinstance(obj.state, dict) else {}
        content = state.get("_content")
        if obj.stub_of.endswith("DictConfig"):
            return {str(k): plain_config(v, depth + 1) for k, v in content.items()} if isinstance(content, dict) \
                else {}
        if obj.stub_of.endswith("ListConfig"):
            return [plain_config(v, depth + 1) for v in content] if isinstance(content, list) else []
        return plain_config(state["_val"], depth + 1) if "_val" in state else None
    if isinstance(obj, dict):
        return {str(k): plain_config(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v, depth + 1) for v in obj]
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else None


def split_checkpoint(ckpt: dict, path: str) -> tuple[dict, dict]:
    """-> (the model's state dict, the file's config as plain data or {})."""
    if isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif any(isinstance(k, str) and k.startswith("visual_encoder.") for k in ckpt):
        sd = ckpt   # a bare state dict
    else:
        keys = ", ".join(repr(k) for k in list(ckpt)[:8])
        raise SimlaFormatError(f"{path}: no 'model' entry (top-level keys: {keys})")
    for k, v in sd.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise SimlaFormatError(f"{path}: model entry {k!r} is a {type(v).__name__}, not a tensor")
    config = plain_config(ckpt.get("config")) if sd is not ckpt else None
    return dict(sd), config if isinstance(config, dict) else {}


# ============================================================================================ the key mapping
def detect_layout(sd: dict, path: str) -> str:
    if any(k.startswith("text_encoder.bert.") for k in sd):
        return "pretrain"
    if any(k.startswith("text_encoder.embeddings.") for k in sd):
        return "retrieval"
    raise SimlaFormatError(f"{path}: no text_encoder.bert.* (pretraining) or text_encoder.embeddings.* (retrieval) "
                           "keys; not a SIMLA checkpoint")


def _momentum_name(ours: str) -> str:
    copy_name = next(c for c in MOMENTUM_COPIES if ours.startswith(c + "."))
    return f"momentum.copies.{copy_name.replace('.', '__')}.{ours[len(copy_name) + 1:]}"


def prefix_rules(layout: str) -> list[tuple[str, str]]:
    """(official prefix, our prefix) pairs; a momentum module `<m>_m.` maps into its momentum copy."""
    t = TEXT_PREFIX[layout]
    online = [("visual_encoder.", "vision."), (t + "embeddings.", "text.embeddings."),
              (t + "encoder.layer.", "text.layers."), ("vision_proj.", "itc.image_proj."),
              ("text_proj.", "itc.text_proj.")]
    if layout == "pretrain":
        online += [("text_encoder.cls.predictions.", "objectives.xmm_text.head."),
                   ("mim_head.", "objectives.xmm_image.head."), ("concept_head.", "objectives.psl.concept_head.")]
    rules = online + [("itm_head.", "itm_head.")]   # SIMLA keeps no momentum ITM head
    for official, ours in online:
        head, rest = official.split(".", 1)
        rules.append((f"{head}_m.{rest}", _momentum_name(ours)))
    return rules


def drop_rules(layout: str) -> list[tuple[str, str]]:
    """(regex over official names, why) for the keys dropped by name."""
    t = re.escape(TEXT_PREFIX[layout]).replace(r"text_encoder", r"text_encoder(_m)?", 1)
    out = [(t + r"embeddings\.position_ids", "BERT's position-id buffer (0..511; ours computes positions)"),
           (r"idx_queue", "the retrieval fine-tuning's image-id queue (our ITA keeps no id queue)")]
    if layout == "pretrain":
        out.append((r"text_encoder(_m)?\.cls\.predictions\.bias",
                    "the same tensor as cls.predictions.decoder.bias (BERT ties them; checked equal)"))
    return out


def dropped_why(name: str, layout: str) -> Optional[str]:
    for pattern, why in drop_rules(layout):
        if re.fullmatch(pattern, name):
            return why
    return None


def our_names(name: str, layout: str) -> Optional[list[str]]:
    """An official key -> our key(s) ([] = dropped by name, None = not part of the layout). queue_ptr -> two keys."""
    if dropped_why(name, layout):
        return []
    if name == TEMPERATURE:
        return ["itc.log_inv_temperature"]
    if name in QUEUES:
        return [f"objectives.ita.{QUEUES[name]}.features"]
    if name == QUEUE_PTR:
        return ["objectives.ita.image_queue.ptr", "objectives.ita.text_queue.ptr"]
    for official, ours in prefix_rules(layout):
        if name.startswith(official):
            return [ours + name[len(official):]]
    return None


def official_name(ours: str, layout: str) -> Optional[str]:
    """Our key -> the official key it comes from (None: new, no counterpart)."""
    special = {"itc.log_inv_temperature": TEMPERATURE, "objectives.ita.image_queue.features": "image_queue",
               "objectives.ita.text_queue.features": "text_queue", "objectives.ita.image_queue.ptr": QUEUE_PTR,
               "objectives.ita.text_queue.ptr": QUEUE_PTR}
    if ours in special:
        return special[ours]
    if ours in NEW:
        return None
    for official, mine in prefix_rules(layout):
        if ours.startswith(mine):
            return official + ours[len(mine):]
    return None


def official_shape(ours: str, shape: tuple) -> tuple:
    """The shape the official file holds for our key of shape `shape`."""
    if ours == "itc.log_inv_temperature":
        return ()
    if ours.endswith("_queue.features"):
        return tuple(reversed(shape))
    return tuple(shape)


# ============================================================================================ sizes and run config
def _need(sd: dict, key: str, path: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise SimlaFormatError(f"{path}: missing key {key}")
    if sd[key].dim() != ndim:
        raise SimlaFormatError(f"{path}: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dimensions")
    return sd[key]


def count_layers(sd: dict, prefix: str) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _heads(width: int, what: str, path: str) -> int:
    if width % 64:
        raise SimlaFormatError(f"{path}: {what} width {width} is not a multiple of 64; the number of attention heads "
                               "(not recorded in the weights) is inferred as width / 64")
    return width // 64


def infer_sizes(sd: dict, layout: str, path: str) -> dict:
    """Every size of the official model, from the tensors' shapes."""
    t = TEXT_PREFIX[layout]
    cls = _need(sd, "visual_encoder.cls_token", path, 3)
    pos = _need(sd, "visual_encoder.pos_embed", path, 3)
    conv = _need(sd, "visual_encoder.patch_embed.proj.weight", path, 4)
    fc1 = _need(sd, "visual_encoder.blocks.0.mlp.fc1.weight", path, 2)
    width, patch = int(cls.shape[-1]), int(conv.shape[-1])
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise SimlaFormatError(f"{path}: visual_encoder.pos_embed has {pos.shape[1]} rows, not 1 + a square grid")
    words = _need(sd, t + "embeddings.word_embeddings.weight", path, 2)
    positions = _need(sd, t + "embeddings.position_embeddings.weight", path, 2)
    ffn = _need(sd, t + "encoder.layer.0.intermediate.dense.weight", path, 2)
    proj = _need(sd, "vision_proj.weight", path, 2)
    queue = _need(sd, "image_queue", path, 2)
    hidden = int(words.shape[1])
    out = {"width": width, "patch": patch, "img_size": grid * patch,
           "depth": count_layers(sd, "visual_encoder.blocks."),
           "vision_mlp_ratio": fc1.shape[0] / width, "vision_heads": _heads(width, "visual_encoder", path),
           "mask_token": "visual_encoder.mask_token" in sd, "vocab": int(words.shape[0]), "hidden": hidden,
           "positions": int(positions.shape[0]), "text_layers": count_layers(sd, t + "encoder.layer."),
           "text_ffn": int(ffn.shape[0]), "text_heads": _heads(hidden, "text_encoder", path),
           "embed_dim": int(proj.shape[0]), "queue_size": int(queue.shape[1])}
    if layout == "pretrain":
        out["mim_vocab"] = int(_need(sd, "mim_head.weight", path, 2).shape[0])
    return out


def base_config(config_path: Optional[str]) -> tuple[dict, str]:
    import yaml

    path = config_path or PRESET
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SimlaFormatError(f"{path}: cannot read the config ({_first_line(e)})") from None
    if not isinstance(tree, dict):
        raise SimlaFormatError(f"{path}: expected a mapping at the top level")
    return tree, os.path.relpath(path) + (" (--config)" if config_path else " (the SIMLA preset)")


def _number(hp: dict, key: str, lo: float, hi: float, open_low: bool = False) -> Optional[float]:
    v = hp.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if (lo < v if open_low else lo <= v) and v <= hi else None


def build_config(base: dict, sizes: dict, layout: str, tokenizer: str, hp: dict) -> tuple[dict, list[str]]:
    """The run config of the imported model: `base` with every size from the file, both towers random-init, the
    objectives of the layout (settings from `base`, alpha / momentum / mlm_probability from the file's config)."""
    config = copy.deepcopy(base)
    notes = []
    model = config.setdefault("model", {})
    model["family"] = "single_stream"
    vision = dict(model.get("vision") or {})
    for k in ("drop_last_blocks", "num_frames"):
        vision.pop(k, None)
    vision.update(timm_name=TIMM_NAME, pretrained=None, img_size=sizes["img_size"], patch_size=sizes["patch"],
                  embed_dim=sizes["width"], depth=sizes["depth"], num_heads=sizes["vision_heads"],
                  mlp_ratio=sizes["vision_mlp_ratio"], mask_token=sizes["mask_token"])
    model["vision"] = vision
    model["text"] = {"pretrained": None, "tokenizer": tokenizer, "arch": "bert", "hidden_size": sizes["hidden"],
                     "num_layers": sizes["text_layers"], "num_heads": sizes["text_heads"],
                     "intermediate_size": sizes["text_ffn"], "vocab_size": sizes["vocab"],
                     "max_position_embeddings": sizes["positions"],
                     "dropout": (model.get("text") or {}).get("dropout", 0.1), "layer_norm_eps": 1e-12}
    model.pop("fusion", None)   # the single-stream family has none
    model["heads"] = None
    itc = dict(model.get("itc") or {})
    lo, hi = TEMPERATURE_RANGE
    init = itc.get("init_temperature", 0.07)
    itc.update(embed_dim=sizes["embed_dim"], projection="linear", parameterization="log", min_temperature=lo,
               max_temperature=hi, init_temperature=init if isinstance(init, (int, float)) and lo <= init <= hi
               else 0.07)
    model["itc"] = itc
    notes.append(f"sizes from the weights: ViT {sizes['depth']} blocks x {sizes['width']} at {sizes['img_size']} px "
                 f"(patch {sizes['patch']}{', mask token' if sizes['mask_token'] else ''}), BERT "
                 f"{sizes['text_layers']} layers x {sizes['hidden']}, vocabulary {sizes['vocab']}; attention heads "
                 f"width/64 = {sizes['vision_heads']} / {sizes['text_heads']} (not recorded in the weights)")

    base_obj = base.get("objectives") or {}
    objectives = {}
    for name in OBJECTIVES[layout]:
        objectives[name] = dict(base_obj.get(name) or {"weight": 1.0})
    objectives["ita"]["queue_size"] = sizes["queue_size"]
    alpha, momentum = _number(hp, "alpha", 0, 1), _number(hp, "momentum", 0, 1 - 1e-12)
    mlm_p = _number(hp, "mlm_probability", 0, 1 - 1e-12, open_low=True)
    for name, cfg in objectives.items():
        if name == "itm":
            continue
        if alpha is not None:
            cfg["alpha"] = alpha
        if momentum is not None:
            cfg["momentum"] = momentum
    took = [f"{k} {v}" for k, v in (("alpha", alpha), ("momentum", momentum), ("mlm_probability", mlm_p))
            if v is not None]
    if "xmm_text" in objectives:
        objectives["xmm_text"]["tie_decoder"] = True
        if mlm_p is not None:
            objectives["xmm_text"]["mask_prob"] = mlm_p
    if "xmm_image" in objectives:
        x = objectives["xmm_image"]
        x.pop("random_tokenizer", None)
        x["tokenizer"] = x.get("tokenizer") or DVAE_PLACEHOLDER
        notes.append(f"objectives.xmm_image.tokenizer = {x['tokenizer']}: the DALL-E dVAE is not part of a SIMLA "
                     f"checkpoint; write it there (import --format dalle-dvae; vocabulary {sizes['mim_vocab']}, the "
                     "file's mim_head rows) before pretraining further")
    if took:
        notes.append("from the file's config: " + ", ".join(took))
    config["objectives"] = objectives

    data = config.setdefault("data", {})
    data["image_size"] = sizes["img_size"]
    if "xmm_image" not in objectives:
        data.pop("tokenizer_view", None)
    if "xmm_text" not in objectives:
        data.pop("mlm_probability", None)
    return config, notes


# ============================================================================================ import
@dataclass
class Imported:
    state_dict: dict                              # our keys -> tensors (fp32; views of the source where possible)
    dropped: list = field(default_factory=list)   # official keys dropped by name
    new: list = field(default_factory=list)       # our keys the file has no value for
    notes: list = field(default_factory=list)


def reference_model(config: dict, path: str, mim_vocab: Optional[int] = None) -> dict:
    """The state dict (meta tensors) of the model `config` builds. xmm_image's dVAE is not part of the state dict:
    the reference uses a random stand-in of mim_head's vocabulary, so no tokenizer file is needed here."""
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.checks import check_config
    from train.config import config_from_dict

    tree = copy.deepcopy(config)
    x = (tree.get("objectives") or {}).get("xmm_image")
    if x is not None:
        x.pop("tokenizer", None)
        x["random_tokenizer"] = {"vocab_size": int(mim_vocab)}
    cfg = config_from_dict(tree, name="import")
    check_config(cfg, "the imported run config")
    try:
        tok = load_tokenizer(cfg.model.text)
    except (OSError, ValueError, ImportError) as e:
        raise SimlaFormatError(f"{cfg.model.text.tokenizer}: cannot load a tokenizer from it ({_first_line(e)})") \
            from None
    vocab = cfg.model.text.vocab_size
    if len(tok) != vocab:
        raise SimlaFormatError(f"{path}: the file's vocabulary has {vocab} rows but the tokenizer "
                               f"{cfg.model.text.tokenizer} has {len(tok)} tokens; pass --tokenizer with the one it "
                               "was trained with (bert-base-uncased's, which `minilm` shares)")
    try:
        with torch.device("meta"):
            return build_model(cfg.model, cfg.objectives, tok).state_dict()
    except ValueError as e:
        raise SimlaFormatError(f"{path}: the imported config does not build: {e}") from None


def _check_tied(sd: dict, a: str, b: str, path: str, why: str) -> None:
    if a in sd and b in sd and not (sd[a].shape == sd[b].shape and torch.equal(sd[a], sd[b])):
        raise SimlaFormatError(f"{path}: {a} differs from {b}; {why}")


def official_to_ours(sd: dict, reference: dict, layout: str, path: str) -> Imported:
    """Official keys -> ours, strictly: every official key maps (with its shape) or is dropped by name, every
    reference key is filled except NEW."""
    expected = {}
    for k, v in reference.items():
        name = official_name(k, layout)
        if name is not None:
            expected.setdefault(name, official_shape(k, tuple(v.shape)))
    missing = sorted(set(expected) - set(sd))
    if missing:
        hint = ""
        t = TEXT_PREFIX[layout]
        if ".crossattention." in missing[0] and any(k.startswith(t + "encoder.layer.") and ".crossattention." in k
                                                    for k in sd):
            hint = (" (cross-attention in only some layers: an ALBEF file? SIMLA's single-stream BERT has it in "
                    "every layer)")
        raise SimlaFormatError(f"{path}: missing key {missing[0]}{hint}")
    if layout == "pretrain":
        for m in ("", "_m"):
            p = f"text_encoder{m}.cls.predictions."
            _check_tied(sd, p + "bias", p + "decoder.bias", path, "BERT ties them and our MLM head has one bias")
            _check_tied(sd, p + "decoder.weight", f"text_encoder{m}.bert.embeddings.word_embeddings.weight", path,
                        "our MLM decoder is the word-embedding table itself (tie_decoder)")
    out, dropped = {}, []
    for name, tensor in sd.items():
        ours = our_names(name, layout)
        if ours is None:
            raise SimlaFormatError(f"{path}: unexpected key {name} (not part of the SIMLA {layout} layout)")
        if not ours:
            dropped.append(name)
            continue
        for k in ours:
            if k not in reference:
                raise SimlaFormatError(f"{path}: {name} maps to {k}, which the model built from the file's sizes "
                                       "lacks")
        want = expected[name]
        if tuple(tensor.shape) != want:
            raise SimlaFormatError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {want}")
        if tensor.is_floating_point():
            tensor = tensor.float()
        if name == TEMPERATURE:
            t = float(tensor)
            if not t > 0:
                raise SimlaFormatError(f"{path}: temp = {t} is not a temperature (must be > 0)")
            tensor = torch.tensor([-math.log(t)], dtype=torch.float32)
        elif name in QUEUES:
            tensor = tensor.t()
        elif name == QUEUE_PTR:
            tensor = tensor.to(reference[ours[0]].dtype)
        for k in ours:
            out[k] = tensor
    new = sorted(set(reference) - set(out))
    odd = [k for k in new if k not in NEW]
    if odd:   # cannot happen with a consistent layout table: a model key the file has no place for
        raise SimlaFormatError(f"{path}: the model built from the file's sizes has {odd[0]}, which a SIMLA file "
                               "cannot hold")
    return Imported(out, sorted(dropped), new)


def fill_new(imported: Imported, reference: dict, vision_cfg: dict) -> None:
    """vision.temporal_embed: our init (seeded); momentum copies: copies of their online weights (as a fresh build)."""
    sd = imported.state_dict
    if "vision.temporal_embed" in imported.new:
        shape = reference["vision.temporal_embed"].shape
        std = vision_cfg.get("temporal_init_std", 0.02)
        std = shape[-1] ** -0.5 if std is None else std
        sd["vision.temporal_embed"] = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * std
    for k in imported.new:
        if k == "vision.temporal_embed":
            continue
        online = online_key(k)
        if online not in sd:
            raise SimlaFormatError(f"{k}: no online weights to copy it from")
        sd[k] = sd[online].clone()
    if imported.new:
        imported.notes.append(f"new (not in the file): {', '.join(imported.new)} (the temporal table: our init; "
                              "momentum copies: copies of their online weights)")


def import_state_dict(sd: dict, hp: dict, path: str, config_path: Optional[str] = None,
                      tokenizer: Optional[str] = None) -> tuple[Imported, dict, str]:
    """The official state dict (+ its config as plain data) -> (imported weights with every key of the model the
    run config builds, that run config, the layout). The reference model is built on the meta device."""
    from models.weights import check_keys

    layout = detect_layout(sd, path)
    sizes = infer_sizes(sd, layout, path)
    base, why = base_config(config_path)
    tok = tokenizer or "minilm"
    if tok != "minilm":
        if not os.path.isdir(tok):
            raise SimlaFormatError(f"--tokenizer {tok}: not a directory (a local bert-base-uncased tokenizer, or "
                                   "'minilm'; nothing is downloaded)")
        tok = os.path.abspath(tok)
    config, notes = build_config(base, sizes, layout, tok, hp)
    reference = reference_model(config, path, sizes.get("mim_vocab"))
    imported = official_to_ours(sd, reference, layout, path)
    imported.notes = [f"config: {why}; layout: SIMLA {layout}"] + notes
    fill_new(imported, reference, config["model"]["vision"])
    check_keys(imported.state_dict, reference, f"{path}: imported weights vs the model its config builds")
    return imported, config, layout


def import_checkpoint(path: str, config_path: Optional[str] = None, tokenizer: Optional[str] = None
                      ) -> tuple[Imported, dict, dict]:
    """A released SIMLA file -> (imported weights, run config, metadata of our `kind: vlp` file)."""
    ckpt = read_checkpoint(path)
    sd, hp = split_checkpoint(ckpt, path)
    imported, config, layout = import_state_dict(sd, hp, path, config_path, tokenizer)
    epoch = ckpt.get("epoch")
    meta = {"kind": "vlp", "config": config, "dropped": imported.dropped, "new": imported.new,
            "source": os.path.abspath(path), "format_in": f"simla-{layout}",
            "epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None}
    return imported, config, meta
