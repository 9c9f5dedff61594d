"""The released SCL / GLSCL checkpoints (IIGROUP/SCL: MGSC-100k.ckpt, GLSCL-100k.ckpt) and METER's <-> our VLPModel.

Used by `train/convert_checkpoint.py import --format scl|meter` and `export --format scl`. The official layout
(shared/reference/scl_checkpoint/README.md) and ours, key for key:

  official (Lightning `state_dict`)                         ours (VLPModel)
  {V}conv1, class_embedding [D],                           vision.patch_embed.proj, cls_token [1,1,D],
     positional_embedding [N,D]                               pos_embed [1,N,D]
  {V}ln_pre, ln_post                                       vision.norm_pre, vision.norm
  {V}transformer.resblocks.i.{ln_1, attn.in_proj_*,        vision.blocks.i.{norm1, attn.qkv.* (same q|k|v rows),
     attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}               attn.proj, norm2, mlp.fc1, mlp.fc2}
  {V}temporal_embed [1,T,D] (older video CLIP module)      vision.temporal_embed (else new: zeros, no time offset)
  {V}visual_mask_token [1,D]                               objectives.mltc.mask_token [1,1,D]
  text_transformer.embeddings.*, .encoder.layer.i.*        text.embeddings.*, text.layers.i.*
  cross_modal_{s}_transform, token_type_embeddings         fusion.{s}_in, fusion.token_type
  cross_modal_{s}_layers.i.{attention.self.q/k/v,          fusion.layers.i.{s}.{self_attn.q/k/v, self_out, self_norm,
     attention.output.{dense,LayerNorm}, crossattention.*,    cross_attn.q/k/v, cross_out, cross_norm,
     intermediate.dense, output.{dense,LayerNorm}}            ffn.0, ffn.2, ffn_norm}          (s = text | image)
  cross_modal_{s}_pooler.dense                             fusion.{s}_pooler.0
  vision_proj / language_proj .{0,1,3}; cl_temp []         itc.image_proj / itc.text_proj; itc.temperature [1] (raw)
                                                             or itc.log_inv_temperature [1] = log(1/cl_temp) (log)
  itm_score.fc                                             itm_head
  mlm_score.{transform.dense, transform.LayerNorm,         objectives.mlm.head.{transform.0, transform.2,
     decoder.weight, bias}                                    decoder.weight, decoder.bias}
{V} = `vision_transformer.visual.` (SCL/GLSCL) or `vit_model.visual.` (METER). Dropped on import, by name: the MAE
decoder SCL always builds and never trains, the text pooler (unused), the position-id buffer, METER's CLIP text-tower
leftovers and downstream heads. Which objectives the imported model has follows the file: ITC heads -> itc, itm_score
-> itm, mlm_score -> mlm, visual_mask_token -> mltc; mgsc (no parameters) when the file's hyper_parameters say so, or
for any SCL-layout file without them.

The files are PyTorch Lightning checkpoints. Lightning 1.x pickles callback classes as dict keys, so
torch.load(weights_only=True) refuses them: `read_checkpoint` unpickles with `RestrictedUnpickler`, which rebuilds
tensors and plain containers and turns every other global into an inert `Stub` (no import, no call of anything the
file names), refusing outright globals that only an attack would name (os.system, builtins.eval, ...).
"""
from __future__ import annotations

import codecs
import collections
import copy
import functools
import math
import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from models.momentum import online_key
from models.weights import WeightsError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"glscl": os.path.join(REPO_ROOT, "train", "configs", "glscl_4m.yaml"),
           "scl": os.path.join(REPO_ROOT, "train", "configs", "scl_4m.yaml")}
VISION_PREFIX = {"scl": "vision_transformer.visual.", "meter": "vit_model.visual."}
EXPORT_RECORD = "glscl_export"   # top-level entry of files `export --format scl` writes (ignored by the official code)
EXPORT_FORMAT = "glscl-scl-export-v1"


class SclFormatError(WeightsError):
    """Bad input or a layout mismatch; one line naming the file and key (convert_checkpoint prints it, exit 2)."""


# ============================================================================================ restricted unpickling
class Stub:
    """An object of a class (or the result of a function) that a checkpoint names but we never import: it keeps only
    what the pickle hands it (constructor arguments, state, items), so nothing of that class ever runs."""

    stub_of = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.elements = args, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):   # pickle's BUILD
        self.state = state

    def __setitem__(self, key, value):   # SETITEMS of a dict subclass (e.g. Lightning's AttributeDict)
        self.items[key] = value

    def append(self, value):   # APPENDS of a list subclass
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self):
        return f"<stub of {self.stub_of}>"


def _safe_torch_globals() -> dict:
    from torch import _utils

    names = ["_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
             "_rebuild_parameter_with_state"]
    out = {("torch._utils", n): getattr(_utils, n) for n in names if hasattr(_utils, n)}
    out.update({("torch", "Size"): torch.Size, ("torch", "device"): torch.device, ("torch", "Tensor"): torch.Tensor,
                ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
                ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2})
    return out


_SAFE_TORCH = _safe_torch_globals()
_SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                 ("_codecs", "encode"): codecs.encode,   # protocol-2 pickles spell bytes as encode(str, 'latin1')
                 **{("builtins", t.__name__): t for t in (set, frozenset, slice, range, complex, bytearray, bytes,
                                                          int, float, bool, str, tuple, list, dict)}}

# Modules whose globals a checkpoint has no reason to name: a file that names one is refused outright (the stubs
# would keep it inert anyway; refusing says loudly that the file was built to run code).
_REFUSED_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy", "pickle",
    "_pickle", "cPickle", "marshal", "ctypes", "_ctypes", "socket", "pty", "code", "codeop", "types", "operator",
    "functools", "itertools", "io", "_io", "tempfile", "webbrowser", "multiprocessing", "threading", "_thread",
    "signal", "pathlib", "glob", "pydoc", "inspect", "gc", "weakref", "asyncio", "http", "urllib", "ftplib",
    "smtplib", "telnetlib", "zipimport", "pkgutil", "site", "sysconfig", "platform", "bdb", "pdb", "timeit", "trace",
    "profile", "cProfile", "dill", "cloudpickle", "joblib", "shelve", "dbm", "sqlite3", "zipfile", "tarfile",
    "codecs", "_codecs", "copyreg", "torch", "numpy.testing", "numpy.f2py", "numpy.distutils",
}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """find_class: tensors' rebuild functions and plain containers are real; modules that only attacks name are
    refused; any other global becomes a Stub subclass of that name (one per global, so dict keys stay distinct)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if key in _SAFE_TORCH:
            return _SAFE_TORCH[key]
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):   # vars: no lazy submodule import
            return vars(torch)[name]
        parts = module.split(".")
        if any(".".join(parts[:i]) in _REFUSED_MODULES for i in range(1, len(parts) + 1)):
            raise RefusedGlobal(f"the pickle names {module}.{name}")
        if key not in self.stubs:
            self.stubs[key] = type(str(name), (Stub,), {"stub_of": f"{module}.{name}", "__module__": "stub"})
        return self.stubs[key]


# torch.load calls pickle_module.Unpickler / pickle_module.load; this module object offers only the restricted ones.
_PICKLE_MODULE = types.ModuleType("glscl_restricted_pickle")
_PICKLE_MODULE.Unpickler = RestrictedUnpickler
_PICKLE_MODULE.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()


def read_checkpoint(path: str) -> dict:
    """-> the checkpoint's top-level dict, unpickled with RestrictedUnpickler (tensor data memory-mapped)."""
    if not os.path.isfile(path):
        raise SclFormatError(f"{path}: no such file")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        # torch.load would hand a TorchScript archive to torch.jit.load (which runs its code): refuse it first.
        if any(n.endswith("constants.pkl") for n in names) or not any(n.endswith("data.pkl") for n in names):
            raise SclFormatError(f"{path}: a zip archive but not a torch.save checkpoint (no data.pkl, or TorchScript)")
    else:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":   # torch's legacy format starts with a binary pickle
                raise SclFormatError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_PICKLE_MODULE, weights_only=False, mmap=is_zip)
    except RefusedGlobal as e:
        raise SclFormatError(f"{path}: refused: {e}; a checkpoint never needs it, so the file was not read") from None
    except Exception as e:   # noqa: BLE001 - a corrupt file raises many types; all mean "not readable"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SclFormatError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise SclFormatError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def plain(obj):
    """A Stub of a dict subclass (Lightning's AttributeDict, ...) -> its items; anything else unchanged."""
    if isinstance(obj, Stub):
        return dict(obj.items) if obj.items else (obj.state if isinstance(obj.state, dict) else {})
    return obj


def split_checkpoint(ckpt: dict, path: str) -> tuple[dict, dict, dict]:
    """Lightning checkpoint (or the official loader's {'model': sd}, or a bare state dict) -> (state dict,
    hyper_parameters['config'] or {}, our export record or {})."""
    if isinstance(ckpt.get("state_dict"), dict):
        sd = ckpt["state_dict"]
    elif isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif any(k.startswith(tuple(VISION_PREFIX.values())) for k in ckpt if isinstance(k, str)):
        sd = ckpt
    else:
        keys = ", ".join(repr(k) for k in list(ckpt)[:8])
        raise SclFormatError(f"{path}: no 'state_dict' or 'model' entry (top-level keys: {keys})")
    for k, v in sd.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise SclFormatError(f"{path}: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
    hp = plain(ckpt.get("hyper_parameters")) or {}
    config = plain(hp.get("config")) if isinstance(hp, dict) else None
    record = ckpt.get(EXPORT_RECORD)
    return dict(sd), config if isinstance(config, dict) else {}, record if isinstance(record, dict) else {}


# ============================================================================================ the key mapping
# (official, ours) name patterns. {i}: a layer index, {p}: weight|bias, {s}: text|image (the same on both sides),
# {rest}: any dotted remainder, {V}: the vision tower's prefix. cl_temp is handled apart (its value changes).
_STREAM_LAYER = [("attention.self.query", "self_attn.q"), ("attention.self.key", "self_attn.k"),
                 ("attention.self.value", "self_attn.v"), ("attention.output.dense", "self_out"),
                 ("attention.output.LayerNorm", "self_norm"), ("crossattention.self.query", "cross_attn.q"),
                 ("crossattention.self.key", "cross_attn.k"), ("crossattention.self.value", "cross_attn.v"),
                 ("crossattention.output.dense", "cross_out"), ("crossattention.output.LayerNorm", "cross_norm"),
                 ("intermediate.dense", "ffn.0"), ("output.dense", "ffn.2"), ("output.LayerNorm", "ffn_norm")]
_CLIP_BLOCK = [("ln_1", "norm1"), ("attn.out_proj", "attn.proj"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"),
               ("mlp.c_proj", "mlp.fc2")]
RULES = [
    ("{V}conv1.weight", "vision.patch_embed.proj.weight"),
    ("{V}class_embedding", "vision.cls_token"),
    ("{V}positional_embedding", "vision.pos_embed"),
    ("{V}temporal_embed", "vision.temporal_embed"),
    ("{V}ln_pre.{p}", "vision.norm_pre.{p}"),
    ("{V}ln_post.{p}", "vision.norm.{p}"),
    ("{V}transformer.resblocks.{i}.attn.in_proj_weight", "vision.blocks.{i}.attn.qkv.weight"),
    ("{V}transformer.resblocks.{i}.attn.in_proj_bias", "vision.blocks.{i}.attn.qkv.bias"),
    *[(f"{{V}}transformer.resblocks.{{i}}.{a}.{{p}}", f"vision.blocks.{{i}}.{b}.{{p}}") for a, b in _CLIP_BLOCK],
    ("{V}visual_mask_token", "objectives.mltc.mask_token"),
    ("text_transformer.embeddings.{rest}", "text.embeddings.{rest}"),
    ("text_transformer.encoder.layer.{i}.{rest}", "text.layers.{i}.{rest}"),
    ("cross_modal_{s}_transform.{p}", "fusion.{s}_in.{p}"),
    ("token_type_embeddings.weight", "fusion.token_type.weight"),
    *[(f"cross_modal_{{s}}_layers.{{i}}.{a}.{{p}}", f"fusion.layers.{{i}}.{{s}}.{b}.{{p}}") for a, b in _STREAM_LAYER],
    ("cross_modal_{s}_pooler.dense.{p}", "fusion.{s}_pooler.0.{p}"),
    ("vision_proj.{i}.{p}", "itc.image_proj.{i}.{p}"),
    ("language_proj.{i}.{p}", "itc.text_proj.{i}.{p}"),
    ("itm_score.fc.{p}", "itm_head.{p}"),
    ("mlm_score.transform.dense.{p}", "objectives.mlm.head.transform.0.{p}"),
    ("mlm_score.transform.LayerNorm.{p}", "objectives.mlm.head.transform.2.{p}"),
    ("mlm_score.decoder.weight", "objectives.mlm.head.decoder.weight"),
    ("mlm_score.bias", "objectives.mlm.head.decoder.bias"),
]
TEMPERATURE = "cl_temp"
TEMPERATURE_OURS = ("itc.temperature", "itc.log_inv_temperature")   # raw / log parameterization

# Reshapes between official and our shapes, keyed by our name: (to ours, to official).
_RESHAPE: dict[str, tuple[Callable, Callable]] = {
    "vision.cls_token": (lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
    "vision.pos_embed": (lambda t: t.unsqueeze(0), lambda t: t.squeeze(0)),
    "objectives.mltc.mask_token": (lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(1, -1)),
}

# Dropped on import, by name, with the reason printed.
DROP = [
    (r"vision_transformer\.(mask_token|decoder_.+)", "the MAE decoder (always built, never trained)"),
    (r"text_transformer\.pooler\..+", "the text pooler (unused)"),
    (r"text_transformer\.embeddings\.(position_ids|token_type_ids)", "an index buffer of old transformers versions"),
    (r"vit_model\.(token_embedding\..+|positional_embedding|ln_final\..+|transformer\..+|text_projection|logit_scale)",
     "METER's CLIP text-tower leftovers"),
    (r"(vqa_classifier|nlvr2_classifier|snli_classifier|rank_output)\..+", "a downstream head (tasks build their own)"),
    (r"msm_temp", "MGSC's learnt temperature (ours is the setting objectives.mgsc.temperature, set from it)"),
]
# Our keys with no official counterpart: new on import (filled as described), not written on export.
_NO_COUNTERPART = re.compile(r"momentum\..+|objectives\.(?!mlm\.|mltc\.)\w+\..+")


def _compile(pattern: str, prefix: str) -> re.Pattern:
    out = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", pattern.replace("{V}", prefix)):
        out += re.escape(literal)
        if name:
            out += {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "s": r"(?P<s>text|image)",
                    "rest": r"(?P<rest>.+)"}[name]
    return re.compile(out)


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in rules:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


@functools.lru_cache(maxsize=None)
def _rules(flavour: str, to_ours: bool) -> list[tuple[re.Pattern, str]]:
    prefix = VISION_PREFIX[flavour]
    if to_ours:
        return [(_compile(a, prefix), b.replace("{V}", prefix)) for a, b in RULES]
    return [(_compile(b, prefix), a.replace("{V}", prefix)) for a, b in RULES]


def official_name(ours: str, flavour: str = "scl") -> Optional[str]:
    """Our key -> its official name (None: no counterpart in the official layout)."""
    if ours in TEMPERATURE_OURS:
        return TEMPERATURE
    return _rename(ours, _rules(flavour, to_ours=False))


def detect_flavour(sd: dict, path: str) -> str:
    for flavour, prefix in VISION_PREFIX.items():
        if any(k.startswith(prefix) for k in sd):
            return flavour
    raise SclFormatError(f"{path}: no vision_transformer.visual.* (SCL/GLSCL) or vit_model.visual.* (METER) keys; "
                         "not a checkpoint of either")


def dropped_why(name: str) -> Optional[str]:
    for pattern, why in DROP:
        if re.fullmatch(pattern, name):
            return why
    return None


# ============================================================================================ temperature
def log_temperature_from_official(cl_temp: float, record: dict) -> float:
    """log(1/tau) as float32. A file our export wrote carries the exact log value it came from (float32 cannot always
    round-trip tau -> log -> tau -> log); it is used when it still agrees with the file's cl_temp."""
    exact = record.get("log_inv_temperature")
    if isinstance(exact, float) and _float32(math.exp(-exact)) == cl_temp:
        return exact
    return _float32(-math.log(cl_temp))


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


# ============================================================================================ import
@dataclass
class Imported:
    state_dict: dict                              # our keys -> fp32 tensors (views of the source where possible)
    dropped: list = field(default_factory=list)   # official keys dropped by name
    new: list = field(default_factory=list)       # our keys the file has no value for (filled as printed)
    notes: list = field(default_factory=list)


def count_layers(sd: dict, prefix: str) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def _need(sd: dict, key: str, path: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        raise SclFormatError(f"{path}: missing key {key}")
    if sd[key].dim() != ndim:
        raise SclFormatError(f"{path}: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dimensions")
    return sd[key]


def infer_sizes(sd: dict, flavour: str, path: str) -> dict:
    """Every size the official layout fixes, read from the tensors' shapes."""
    v = VISION_PREFIX[flavour]
    conv = _need(sd, v + "conv1.weight", path, 4)
    pos = _need(sd, v + "positional_embedding", path, 2)
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise SclFormatError(f"{path}: {v}positional_embedding has {pos.shape[0]} rows, not 1 + a square grid")
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    blocks = count_layers(sd, v + "transformer.resblocks.")
    fc = _need(sd, v + "transformer.resblocks.0.mlp.c_fc.weight", path, 2)
    words = _need(sd, "text_transformer.embeddings.word_embeddings.weight", path, 2)
    text_pos = _need(sd, "text_transformer.embeddings.position_embeddings.weight", path, 2)
    text_ffn = _need(sd, "text_transformer.encoder.layer.0.intermediate.dense.weight", path, 2)
    fusion_in = _need(sd, "cross_modal_text_transform.weight", path, 2)
    fusion_ffn = _need(sd, "cross_modal_text_layers.0.intermediate.dense.weight", path, 2)
    out = {"width": width, "patch": patch, "img_size": grid * patch, "blocks": blocks,
           "vision_mlp_ratio": fc.shape[0] / width, "vocab": int(words.shape[0]), "text_hidden": int(words.shape[1]),
           "text_positions": int(text_pos.shape[0]), "text_layers": count_layers(sd, "text_transformer.encoder.layer."),
           "text_ffn": int(text_ffn.shape[0]), "fusion_hidden": int(fusion_in.shape[0]),
           "fusion_layers": count_layers(sd, "cross_modal_text_layers."),
           "fusion_mlp_ratio": fusion_ffn.shape[0] / fusion_in.shape[0]}
    if "vision_proj.3.weight" in sd:
        out["itc_dim"] = int(_need(sd, "vision_proj.3.weight", path, 2).shape[0])
    if v + "temporal_embed" in sd:
        out["frames"] = int(_need(sd, v + "temporal_embed", path, 3).shape[1])
    return out


def official_to_ours(sd: dict, reference: dict, path: str, record: Optional[dict] = None) -> Imported:
    """Official keys -> ours, checked strictly against `reference` (our model's state dict; meta tensors are fine).
    Every official key is mapped or dropped by name; every reference key is filled, or new when the official layout
    has no place for it (vision.temporal_embed: zeros; momentum copies and other objectives' state: see
    `fill_new`). Floating tensors become fp32; renamed tensors are the source's own (views)."""
    flavour = detect_flavour(sd, path)
    rules = _rules(flavour, to_ours=True)
    out, dropped = {}, []
    for name, tensor in sd.items():
        if dropped_why(name):
            dropped.append(name)
            continue
        ours = _temperature_key(reference, path) if name == TEMPERATURE else _rename(name, rules)
        if ours is None:
            raise SclFormatError(f"{path}: unexpected key {name} (not part of the SCL/GLSCL/METER layout)")
        if ours not in reference:
            raise SclFormatError(f"{path}: {name} maps to {ours}, which the model built from the config lacks")
        out[ours] = _to_ours(name, ours, tensor, reference[ours], path, record or {})
    new = sorted(set(reference) - set(out))
    lacking = [k for k in new if official_name(k, flavour) is not None and k != "vision.temporal_embed"]
    if lacking:
        hint = "" if official_name(lacking[0], flavour) != TEMPERATURE else " (ITC projections without cl_temp)"
        raise SclFormatError(f"{path}: missing key {official_name(lacking[0], flavour)}{hint}")
    odd = [k for k in new if official_name(k, flavour) is None and not _NO_COUNTERPART.fullmatch(k)
           and k != "vision.temporal_embed"]
    if odd:
        raise SclFormatError(f"{path}: the model built from the config has {odd[0]}, which the official layout "
                             "cannot hold (is model.vision.timm_name a CLIP-style pre-norm ViT without patch bias?)")
    return Imported(out, sorted(dropped), new)


def _temperature_key(reference: dict, path: str) -> str:
    for k in TEMPERATURE_OURS:
        if k in reference:
            return k
    raise SclFormatError(f"{path}: has cl_temp but the model built from the config has no ITC temperature")


def _to_ours(name: str, ours: str, tensor: torch.Tensor, ref: torch.Tensor, path: str, record: dict):
    if tensor.is_floating_point():
        tensor = tensor.float()
    if name == TEMPERATURE:
        if tensor.numel() != 1:
            raise SclFormatError(f"{path}: cl_temp has shape {tuple(tensor.shape)}, expected a scalar")
        t = float(tensor.reshape(()))
        if ours == "itc.temperature":
            return tensor.reshape(ref.shape)
        if not t > 0:
            raise SclFormatError(f"{path}: cl_temp = {t} cannot be stored as log(1/tau); import with a --config that "
                                 "sets model.itc.parameterization: raw")
        return torch.full(ref.shape, log_temperature_from_official(t, record), dtype=torch.float32)
    to_ours, to_official = _RESHAPE.get(ours, (lambda t: t, lambda t: t))
    want = tuple(to_official(torch.empty(ref.shape, device="meta")).shape)
    if tuple(tensor.shape) != want:
        raise SclFormatError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {want}")
    return to_ours(tensor)


def fill_new(imported: Imported, build_real: Callable[[], dict]) -> None:
    """Values for the keys the file lacks: vision.temporal_embed = zeros (no time offset: the official image model
    has none); momentum copies = their online weights just imported (what a fresh build copies); anything else
    (feature queues, ...) = a fresh model's init (built only when needed, by `build_real`)."""
    sd = imported.state_dict
    real, how = None, {}
    for k in imported.new:
        if k == "vision.temporal_embed":
            how.setdefault("zeros", []).append(k)   # the caller has set it (its shape is the reference's)
            continue
        online = online_key(k)
        if online in sd:
            sd[k] = sd[online].clone()
            how.setdefault("copies of the imported online weights", []).append(k)
            continue
        if real is None:
            real = build_real()
        sd[k] = real[k]
        how.setdefault("a fresh model's init", []).append(k)
    for what, keys in how.items():
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "")
        imported.notes.append(f"new (not in the file), {what}: {shown}")


# ============================================================================================ run config
def choose_preset(sd: dict, hp_config: dict, flavour: str) -> tuple[str, str]:
    """-> (preset path, why) when no --config is given: GLSCL if the file has MLTC's mask token or its
    hyper_parameters enable mltc, else SCL (whose preset also serves METER: objectives follow the file)."""
    if VISION_PREFIX[flavour] + "visual_mask_token" in sd:
        return PRESETS["glscl"], "the file has MLTC's visual_mask_token"
    if (loss_names(hp_config) or {}).get("mltc", 0):
        return PRESETS["glscl"], "its hyper_parameters enable mltc"
    return PRESETS["scl"], "the file has no visual_mask_token and its hyper_parameters do not enable mltc"


def loss_names(hp_config: dict) -> Optional[dict]:
    """The official config's loss_names ({objective: weight}), or None when the file does not say."""
    names = plain(hp_config.get("loss_names"))
    return names if isinstance(names, dict) else None


# objective -> the official key that says the file was trained with it (its parameters)
_EVIDENCE = {"itc": "vision_proj.0.weight", "itm": "itm_score.fc.weight", "mlm": "mlm_score.decoder.weight",
             "mltc": "{V}visual_mask_token"}


def _objectives(base: dict, sd: dict, hp_config: dict, flavour: str) -> tuple[dict, list[str]]:
    """Objectives of the imported model, in the base config's order: those with parameters follow the file; mgsc (none)
    follows the file's hyper_parameters (loss_names mgsc / scl), or without them the layout (SCL yes, METER no);
    any other objective as configured."""
    trained = loss_names(hp_config)
    keep = {name: evidence.replace("{V}", VISION_PREFIX[flavour]) in sd for name, evidence in _EVIDENCE.items()}
    keep["mgsc"] = (bool(trained.get("mgsc", 0) or trained.get("scl", 0)) if trained is not None
                    else flavour == "scl")
    out, notes = {}, []
    for name, cfg in base.items():
        if keep.get(name, True):
            out[name] = cfg
        elif name in _EVIDENCE:
            notes.append(f"objectives.{name} left out: the file has no {_EVIDENCE[name].replace('{V}', '')}")
        else:
            notes.append(f"objectives.{name} left out: " + ("the file's hyper_parameters do not enable it"
                                                             if trained is not None else "a METER checkpoint"))
    for name in keep:
        if keep[name] and name not in out:
            out[name] = {"weight": 1.0}
            notes.append(f"objectives.{name} added with default settings: the file "
                         + ("has its parameters" if name in _EVIDENCE else "was trained with it"))
    return out, notes


def build_config(base: dict, sd: dict, hp_config: dict, flavour: str, tokenizer: str, own_config: bool,
                 path: str) -> tuple[dict, list[str]]:
    """The run config of the imported model: `base` (a preset, --config, or the file's own record) with every size
    taken from the weights, the towers random-init (pretrained cleared), the objectives following the file."""
    config = copy.deepcopy(base)
    sizes = infer_sizes(sd, flavour, path)
    model = config.setdefault("model", {})
    vision = dict(model.get("vision") or {})
    drop = int(vision.get("drop_last_blocks", 1))
    heads = sizes["width"] // 64 if sizes["width"] % 64 == 0 else vision.get("num_heads")   # OpenAI CLIP: width/64
    vision.update(pretrained=None, img_size=sizes["img_size"], patch_size=sizes["patch"], embed_dim=sizes["width"],
                  depth=sizes["blocks"] + drop, num_heads=heads, mlp_ratio=sizes["vision_mlp_ratio"])
    vision.setdefault("timm_name", "vit_base_patch16_clip_quickgelu_224")
    notes = []
    if "frames" in sizes:
        vision["max_frames"] = sizes["frames"]
        if not own_config:   # the older video CLIP module adds temporal row 0 to images too
            vision["temporal_embed_images"] = True
            notes.append("the file has temporal_embed (the older video CLIP module, which adds row 0 to images): "
                         "model.vision.temporal_embed_images = true")
    old_text = model.get("text") or {}
    h = sizes["text_hidden"]
    model["text"] = {"pretrained": None, "tokenizer": tokenizer, "arch": "roberta", "hidden_size": h,
                     "num_layers": sizes["text_layers"],
                     "num_heads": h // 64 if h % 64 == 0 else old_text.get("num_heads", 12),
                     "intermediate_size": sizes["text_ffn"], "vocab_size": sizes["vocab"],
                     # RoBERTa's table has padding_idx + 1 = 2 rows no text position uses; TextConfig adds them back
                     "max_position_embeddings": sizes["text_positions"] - 2,
                     "dropout": old_text.get("dropout", 0.1)}
    fusion = dict(model.get("fusion") or {})
    d = sizes["fusion_hidden"]
    hp_heads = hp_config.get("num_heads")
    fusion.update(hidden_size=d, num_layers=sizes["fusion_layers"], mlp_ratio=sizes["fusion_mlp_ratio"],
                  layer_norm_eps=1e-12,
                  num_heads=hp_heads if isinstance(hp_heads, int) and hp_heads > 0 and d % hp_heads == 0
                  else (d // 64 if d % 64 == 0 else fusion.get("num_heads", 12)))
    model.update(vision=vision, fusion=fusion, heads=None)
    objectives, more = _objectives(config.get("objectives") or {}, sd, hp_config, flavour)
    config["objectives"] = objectives
    notes += more
    if "itc" in objectives:
        itc = dict(model.get("itc") or {})
        if "itc_dim" in sizes:   # else the strict check names the missing key
            itc["embed_dim"] = sizes["itc_dim"]
        if TEMPERATURE in sd and sd[TEMPERATURE].numel() == 1:
            notes += _fit_temperature_range(itc, float(sd[TEMPERATURE].float().reshape(())))
        model["itc"] = itc
    msm = sd.get("msm_temp")
    if "mgsc" in objectives and msm is not None and msm.numel() == 1 and float(msm) > 0:
        objectives["mgsc"] = {**objectives["mgsc"], "temperature": float(msm.float().reshape(()))}
        notes.append(f"objectives.mgsc.temperature = {objectives['mgsc']['temperature']} (the file's msm_temp)")
    data = config.setdefault("data", {})
    if data.get("image_size") is not None and data["image_size"] != sizes["img_size"]:
        data["image_size"] = sizes["img_size"]
        notes.append(f"data.image_size = {sizes['img_size']} (the position table's size)")
    if "mlm" not in objectives and data.get("mlm_probability") is not None:
        data["mlm_probability"] = None   # nothing reads collator-masked text without MLM
    return config, notes


def _fit_temperature_range(itc: dict, t: float) -> list[str]:
    """Widen model.itc's [min, max] to hold the file's temperature, so that the log parameterization's clamp leaves
    it unchanged (the official code divides by cl_temp unclamped)."""
    if not t > 0:
        return []
    from models.backbone import ContrastiveHeadConfig

    lo = itc.get("min_temperature", ContrastiveHeadConfig.min_temperature)
    hi = itc.get("max_temperature", ContrastiveHeadConfig.max_temperature)
    if lo <= t <= hi:
        return []
    itc["min_temperature"], itc["max_temperature"] = min(lo, t), max(hi, t)
    return [f"model.itc temperature range widened to [{itc['min_temperature']}, {itc['max_temperature']}] to hold "
            f"the file's cl_temp {t}"]


# ============================================================================================ export
def ours_to_official(sd: dict, config: dict) -> tuple[dict, list[str]]:
    """Our state dict -> the official SCL layout. -> (official state dict, our keys not written).

    Not written: what the official layout cannot hold (momentum copies, other objectives' state) and
    vision.temporal_embed when it is all zeros (the official image model has none; a nonzero table is written as the
    older video module's `temporal_embed`). The official file's MAE decoder, text pooler and position ids are not
    written either: the official model keeps its own init for them under its strict=False load (nothing reads them).
    """
    _check_exportable(sd, config)
    rules = _rules("scl", to_ours=False)
    out, skipped = {}, []
    for k, v in sd.items():
        if k in TEMPERATURE_OURS:
            out[TEMPERATURE] = export_temperature(k, v)
            continue
        name = _rename(k, rules)
        if name is None or (k == "vision.temporal_embed" and not bool(v.any())):
            if name is None and not _NO_COUNTERPART.fullmatch(k):
                raise SclFormatError(f"{k} has no place in the official SCL layout (a CLIP ViT + RoBERTa model)")
            skipped.append(k)
            continue
        out[name] = _RESHAPE.get(k, (None, lambda t: t))[1](v).contiguous()
    return out, skipped


def export_temperature(key: str, value: torch.Tensor) -> torch.Tensor:
    """cl_temp (0-d) from our ITC temperature parameter."""
    if key == "itc.temperature":
        return value.detach().float().reshape(()).clone()
    return torch.tensor(math.exp(-float(value.reshape(()))), dtype=torch.float32)


def _check_exportable(sd: dict, config: dict) -> None:
    """What the official model would compute differently with these weights: refused, naming the setting."""
    model = config["model"]
    if "quickgelu" not in model["vision"].get("timm_name", "") or "vision.norm_pre.weight" not in sd:
        raise SclFormatError(f"model.vision.timm_name is {model['vision'].get('timm_name')!r}; the official vision "
                             "tower is OpenAI CLIP (pre-norm, QuickGELU: a timm *_clip_quickgelu_* model)")
    if model["fusion"].get("layer_norm_eps", 1e-12) != 1e-12:
        raise SclFormatError(f"model.fusion.layer_norm_eps is {model['fusion']['layer_norm_eps']}; the official "
                             "BertCrossLayer uses 1e-12")
    text = model["text"]
    if text.get("pretrained") is None and text.get("arch") != "roberta":
        raise SclFormatError(f"model.text.arch is {text.get('arch')!r}; the official text tower is RoBERTa")
    if "text.embeddings.token_type_embeddings.weight" in sd \
            and sd["text.embeddings.token_type_embeddings.weight"].shape[0] != 1:
        raise SclFormatError("text.embeddings.token_type_embeddings.weight has "
                             f"{sd['text.embeddings.token_type_embeddings.weight'].shape[0]} rows; roberta-base "
                             "(the official text tower) has 1")
    width = sd["vision.cls_token"].shape[-1]
    heads = config["model"]["vision"].get("num_heads")
    if heads is not None and heads != width // 64:
        raise SclFormatError(f"model.vision.num_heads is {heads}; the official CLIP tower uses width/64 = "
                             f"{width // 64} heads, so it would compute something else")


def official_hparams(config: dict, sd: dict) -> dict:
    """hyper_parameters['config'] in the official names (sizes and objectives; what its code reads at build)."""
    m, objectives, data = config["model"], config.get("objectives") or {}, config.get("data") or {}
    fusion = m["fusion"]
    ratio = fusion.get("mlp_ratio", 4.0)
    out = {"loss_names": {"itm": int("itm" in objectives), "mlm": int("mlm" in objectives), "vqa": 0, "nlvr2": 0,
                          "irtr": 0, "mae": 0, "con": int("itc" in objectives), "mgsc": int("mgsc" in objectives),
                          "mltc": int("mltc" in objectives)},
           "image_size": int(m["vision"]["img_size"]),
           "patch_size": int(sd["vision.patch_embed.proj.weight"].shape[-1]),
           "vocab_size": int(sd["text.embeddings.word_embeddings.weight"].shape[0]),
           "max_text_len": int(data.get("max_text_len") or 50), "tokenizer": "roberta-base",
           "hidden_size": int(fusion["hidden_size"]), "num_layers": count_layers(sd, "text.layers."),
           "num_top_layer": int(fusion["num_layers"]), "num_heads": int(fusion["num_heads"]),
           "mlp_ratio": int(ratio) if float(ratio).is_integer() else float(ratio),
           "drop_rate": float(fusion.get("dropout", 0.1)), "load_path": "", "test_only": False, "is_pretrain": True}
    for ours, theirs, key in (("mgsc", "mask_ratio", "image_mask_ratio"), ("mgsc", "mtm_ratio", "text_mask_ratio"),
                              ("mltc", "image_token_mask_ratio", "image_token_mask_ratio"),
                              ("mlm", "mlm_prob", "mask_prob")):
        if key in (objectives.get(ours) or {}):
            out[theirs] = float(objectives[ours][key])
    return out


# =========================================================================================== whole-file import / export
def import_checkpoint(path: str, config_path: Optional[str] = None, tokenizer: Optional[str] = None,
                      expect: Optional[str] = None) -> tuple[Imported, dict, dict]:
    """An official checkpoint file -> (imported weights, run config, file metadata) for our `kind: vlp` file."""
    ckpt = read_checkpoint(path)
    sd, hp_config, record = split_checkpoint(ckpt, path)
    imported, config = import_state_dict(sd, hp_config, record, path, config_path, tokenizer, expect)
    meta = {"kind": "vlp", "config": config, "dropped": imported.dropped, "new": imported.new,
            "source": os.path.abspath(path), "format_in": detect_flavour(sd, path),
            "step": _plain_int(ckpt.get("global_step")), "epoch": _plain_int(ckpt.get("epoch"))}
    return imported, config, meta


def _plain_int(x) -> Optional[int]:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else None


def import_state_dict(sd: dict, hp_config: dict, record: dict, path: str, config_path: Optional[str] = None,
                      tokenizer: Optional[str] = None, expect: Optional[str] = None) -> tuple[Imported, dict]:
    """The official state dict (+ its hyper_parameters config and our export record, if any) -> (imported weights
    with every key of the model its config builds, that config). Nothing is allocated beyond the fp32 casts and the
    new tensors: the reference model is built on the meta device."""
    flavour = detect_flavour(sd, path)
    if expect is not None and expect != flavour:
        raise SclFormatError(f"{path}: --format {expect}, but the file has the {flavour.upper()} layout "
                             f"({VISION_PREFIX[flavour]}*)")
    base, why, own = base_config(config_path, record, sd, hp_config, flavour)
    tok = tokenizer_dir(tokenizer, base, path)
    config, notes = build_config(base, sd, hp_config, flavour, tok, own, path)
    reference, build_real = reference_model(config, path)
    imported = official_to_ours(sd, reference, path, record)
    imported.notes = [f"config: {why}"] + notes
    if "vision.temporal_embed" in imported.new:
        imported.state_dict["vision.temporal_embed"] = torch.zeros(reference["vision.temporal_embed"].shape)
    fill_new(imported, build_real)
    from models.weights import check_keys

    check_keys(imported.state_dict, reference, f"{path}: imported weights vs the model its config builds")
    return imported, config


def base_config(config_path: Optional[str], record: dict, sd: dict, hp_config: dict, flavour: str
                ) -> tuple[dict, str, bool]:
    """-> (config tree, which one and why, whether it is the file's own). --config wins; then the run config a file
    from `export --format scl` carries; then the preset the file's contents suggest."""
    import yaml

    if config_path is None and isinstance(record.get("config"), dict) and record.get("format") == EXPORT_FORMAT:
        return copy.deepcopy(record["config"]), "the run config this file was exported with", True
    why = "--config"
    if config_path is None:
        config_path, why = choose_preset(sd, hp_config, flavour)
    try:
        with open(config_path) as f:
            tree = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SclFormatError(f"{config_path}: cannot read the config ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(tree, dict):
        raise SclFormatError(f"{config_path}: expected a mapping at the top level")
    return tree, f"{os.path.relpath(config_path)} ({why})", False


def tokenizer_dir(tokenizer: Optional[str], base: dict, path: str) -> str:
    """--tokenizer, else the base config's text tokenizer/pretrained dir; it must be a local directory."""
    text = (base.get("model") or {}).get("text") or {}
    name = tokenizer or text.get("tokenizer") or text.get("pretrained")
    if not name or not os.path.isdir(name):
        raise SclFormatError(f"{path}: no tokenizer: pass --tokenizer DIR, a local roberta-base tokenizer directory "
                             f"(nothing is downloaded){f'; {name!r} is not a directory' if name else ''}")
    return os.path.abspath(name)


def reference_model(config: dict, path: str) -> tuple[dict, Callable[[], dict]]:
    """-> (the state dict of the model `config` builds, on the meta device; a function building it for real, seeded,
    for the init values of keys the file lacks)."""
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.checks import check_config
    from train.config import config_from_dict

    cfg = config_from_dict(config, name="import")
    check_config(cfg, "the imported run config")
    try:
        tok = load_tokenizer(cfg.model.text)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SclFormatError(f"{cfg.model.text.tokenizer}: cannot load a tokenizer from it ({first})") from None
    if tok.pad_token_id != 1:
        raise SclFormatError(f"{cfg.model.text.tokenizer}: pad id {tok.pad_token_id}; the text tower is RoBERTa "
                             "(pad id 1, which its position ids depend on): use a roberta-base tokenizer")

    def build():
        try:
            return build_model(cfg.model, cfg.objectives, tok)
        except ValueError as e:
            raise SclFormatError(f"{path}: the imported config does not build: {e}") from None

    with torch.device("meta"):
        reference = build().state_dict()

    def build_real() -> dict:
        torch.manual_seed(0)
        return build().state_dict()

    return reference, build_real


def export_checkpoint(sd: dict, meta: dict, out: str) -> list[str]:
    """Our weights -> OUT in the official Lightning 1.x layout (loadable with torch.load(weights_only=True)).
    -> our keys not written."""
    config = meta["config"]
    official, skipped = ours_to_official(sd, config)
    record = {"format": EXPORT_FORMAT, "config": config, "not_written": skipped}
    if "itc.log_inv_temperature" in sd:   # float32 cl_temp cannot always give back this exact value
        record["log_inv_temperature"] = float(sd["itc.log_inv_temperature"].reshape(()))
    step = meta.get("step")
    ckpt = {"epoch": 0, "global_step": int(step) if str(step).isdigit() else 0,
            "pytorch-lightning_version": "1.3.2", "state_dict": official, "callbacks": {}, "optimizer_states": [],
            "lr_schedulers": [], "hyper_parameters": {"config": official_hparams(config, sd)}, EXPORT_RECORD: record}
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return skipped
