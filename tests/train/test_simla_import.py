"""`convert_checkpoint.py import --format simla`: the released SIMLA checkpoints (4M pretraining, COCO retrieval) ->
our single-stream VLPModel.

The two released layouts are the manifests of shared/reference/simla_checkpoint/ (copied verbatim at the end of this
file, checked against the shared files when present). Where each official tensor must land is written out here from
that folder's README (`destinations`), not taken from the importer; small official-looking files are written the way
the official code saves them (`{'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'}`, the pretraining file's
config an OmegaConf-like object whose modules exist only while saving).
"""
import base64
import collections
import json
import math
import os
import re
import subprocess
import sys
import types
import typing
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from train import convert_checkpoint as cc
from train import simla_format

SHARED = REPO_ROOT.parent / "shared" / "reference" / "simla_checkpoint"
# our keys no official file holds, by name
NEW = ["momentum.copies.itc.log_inv_temperature", "momentum.copies.vision.temporal_embed", "vision.temporal_embed"]
TOK_VOCAB = 30522   # bert-base-uncased's vocabulary, shared by the default tokenizer (minilm)
DVAE_PATH = "pretrained/dalle_dvae.safetensors"


# --------------------------------------------------------------------------------------------------- the naming table
# official module -> (our online prefix, our momentum-copy prefix or None); text_encoder's `bert.` and `encoder.layer.`
# are handled in `destinations`
_MODULES = {"visual_encoder": ("vision.", "momentum.copies.vision."),
            "text_encoder": ("text.", "momentum.copies.text."),
            "cls.predictions": ("objectives.xmm_text.head.", "momentum.copies.objectives__xmm_text__head."),
            "vision_proj": ("itc.image_proj.", "momentum.copies.itc.image_proj."),
            "text_proj": ("itc.text_proj.", "momentum.copies.itc.text_proj."),
            "itm_head": ("itm_head.", None),
            "mim_head": ("objectives.xmm_image.head.", "momentum.copies.objectives__xmm_image__head."),
            "concept_head": ("objectives.psl.concept_head.", "momentum.copies.objectives__psl__concept_head.")}


def destinations(names, pretrain: bool) -> dict:
    """official key -> [our keys] ([] = dropped by name), from the README's naming scheme."""
    out = {}
    for n in names:
        if n == "temp":
            out[n] = ["itc.log_inv_temperature"]
        elif n in ("image_queue", "text_queue"):
            out[n] = [f"objectives.ita.{n}.features"]
        elif n == "queue_ptr":
            out[n] = ["objectives.ita.image_queue.ptr", "objectives.ita.text_queue.ptr"]
        elif n == "idx_queue" or n.endswith(".embeddings.position_ids") or n.endswith(".cls.predictions.bias"):
            out[n] = []
        else:
            module, rest = n.split(".", 1)
            momentum = module.endswith("_m")
            module = module[:-2] if momentum else module
            if module == "text_encoder" and rest.startswith("cls.predictions."):
                module, rest = "cls.predictions", rest[len("cls.predictions."):]
            elif module == "text_encoder":
                if pretrain:
                    assert rest.startswith("bert."), n
                    rest = rest[len("bert."):]
                if rest.startswith("encoder.layer."):
                    rest = "layers." + rest[len("encoder.layer."):]
            online, mom = _MODULES[module]
            out[n] = [(mom if momentum else online) + rest]
    return out


def read_rows(tsv: str) -> list:
    rows = []
    for line in tsv.splitlines():
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split(",")) if shape else (), dtype))
    return rows


def manifest(which: str) -> str:
    return zlib.decompress(base64.b64decode("".join(PRETRAIN_TSV_Z if which == "pretrain" else RETRIEVAL_TSV_Z))
                           ).decode()


MANIFEST_FILES = {"pretrain": "simla_pretrain_state_dict.tsv", "retrieval": "simla_retrieval_coco_state_dict.tsv"}


def _ours_shape(official: str, shape: tuple) -> tuple:
    """The shape our key has for an official tensor of `shape`: temp 0-d -> (1,), queues transposed."""
    if official == "temp":
        return (1,)
    if official in ("image_queue", "text_queue"):
        return tuple(reversed(shape))
    return shape


def build_reference(config: dict, mim_vocab=None, device="meta"):
    """Our model for a run config; xmm_image's dVAE (never part of a checkpoint) replaced by a random stand-in of the
    MIM head's vocabulary."""
    import copy

    from models.text import load_tokenizer
    from train.config import config_from_dict
    from models.vlp import build_model

    tree = copy.deepcopy(config)
    x = tree["objectives"].get("xmm_image")
    if x is not None:
        assert x.pop("tokenizer") == DVAE_PATH
        x["random_tokenizer"] = {"vocab_size": mim_vocab}
    cfg = config_from_dict(tree, name="test")
    tok = load_tokenizer(cfg.model.text)
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(cfg.model, cfg.objectives, tok)


# --------------------------------------------------------------------------------------------------- (1) manifests
@pytest.mark.parametrize("which", ["pretrain", "retrieval"])
def test_manifest_copy_matches_the_shared_reference(which):
    shared = SHARED / MANIFEST_FILES[which]
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    assert shared.read_text() == manifest(which)


@pytest.mark.parametrize("which, entries, elements", [("pretrain", 972, 557_025_120),
                                                      ("retrieval", 949, 481_104_900)])
def test_full_size_manifest_lands_where_the_naming_scheme_says(which, entries, elements):
    """Every manifest key at full size (constant views: no memory) maps to exactly one of our keys of its shape
    (queues transposed, temp 0-d -> (1,); queue_ptr to both queues' pointers) or is dropped by name; every key of our
    model, built on the meta device from the written config, is covered except the named new ones."""
    rows = read_rows(manifest(which))
    assert len(rows) == entries and sum(math.prod(s) for _, s, _ in rows) == elements
    src = {n: (torch.tensor(0.07) if n == "temp" else torch.zeros((), dtype=getattr(torch, d)).expand(s))
           for n, s, d in rows}
    imported, config, layout = simla_format.import_state_dict(src, {}, f"{which}.pth")
    assert layout == which
    table = destinations(src, which == "pretrain")
    shapes = {n: s for n, s, _ in rows}

    dropped = sorted(n for n, d in table.items() if not d)
    want_dropped = ["text_encoder.embeddings.position_ids", "text_encoder_m.embeddings.position_ids", "idx_queue"] \
        if which == "retrieval" else ["text_encoder.bert.embeddings.position_ids", "text_encoder.cls.predictions.bias",
                                      "text_encoder_m.bert.embeddings.position_ids",
                                      "text_encoder_m.cls.predictions.bias"]
    assert dropped == sorted(want_dropped) and imported.dropped == dropped
    targets = [k for d in table.values() for k in d]
    assert len(targets) == len(set(targets))   # no two official keys land on one of ours
    assert all(len(d) == 1 for n, d in table.items() if d and n != "queue_ptr")

    mim = shapes.get("mim_head.weight", (None,))[0]
    ours = build_reference(config, mim).state_dict()
    assert sorted(set(ours) - set(targets)) == NEW
    assert not set(targets) - set(ours)
    for name, dest in table.items():
        for k in dest:
            want = _ours_shape(name, shapes[name])
            assert tuple(ours[k].shape) == want, (name, k)
            assert tuple(imported.state_dict[k].shape) == want and imported.state_dict[k].numel() == math.prod(
                shapes[name]), (name, k)
    assert set(imported.state_dict) == set(ours)
    assert sorted(imported.new) == NEW
    # the written config follows the file
    m = config["model"]
    assert m["family"] == "single_stream" and m["vision"]["img_size"] == (256 if which == "pretrain" else 384)
    assert m["vision"]["mask_token"] is (which == "pretrain")
    assert m["text"]["pretrained"] is None and m["text"]["tokenizer"] == "minilm"
    assert (m["text"]["hidden_size"], m["text"]["num_layers"], m["text"]["vocab_size"]) == (768, 12, TOK_VOCAB)
    assert m["itc"]["projection"] == "linear" and m["itc"]["embed_dim"] == 256
    assert (m["itc"]["min_temperature"], m["itc"]["max_temperature"]) == (0.001, 0.5)
    assert list(config["objectives"]) == (["ita", "itm", "xmm_text", "xmm_image", "psl"] if which == "pretrain"
                                          else ["ita", "itm"])
    assert config["objectives"]["ita"]["queue_size"] == 65536


# --------------------------------------------------------------------------------------------------- small files
# full size -> small: widths 768 -> 64 (one head), FFN 3072 -> 128, ITC 256 -> 16, queues 65536 -> 512, dVAE
# vocabulary 8192 -> 32, 2 ViT blocks and BERT layers; the text vocabulary (the tokenizer's), positions, the patch
# size and the image grids (256 / 384 px) stay.
_SHRINK = {768: 64, 2304: 192, 3072: 128, 256: 16, 65536: 512, 8192: 32}
H, ITC, Q, MIM = 64, 16, 512, 32


def small_rows(which: str) -> list:
    out = []
    for name, shape, dtype in read_rows(manifest(which)):
        m = re.search(r"\.(blocks|layer)\.(\d+)\.", name)
        if m and int(m.group(2)) >= 2:
            continue
        out.append((name, tuple(_SHRINK.get(s, s) for s in shape), dtype))
    return out


def official_state_dict(which: str, seed: int = 0, mask_token=None) -> dict:
    """A small state dict as the official model's state_dict() holds it: the MLM decoder IS the word-embedding
    table and predictions.bias IS decoder.bias (the same tensors), position ids 0..511, normalised queue columns."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, dtype in small_rows(which):
        if dtype == "int64":
            sd[name] = torch.arange(shape[-1]).expand(shape).clone() if name.endswith("position_ids") else \
                torch.full(shape, -100 if name == "idx_queue" else 128, dtype=torch.long)
        elif name == "temp":
            sd[name] = torch.tensor(0.0543)
        elif name.endswith("_queue"):
            sd[name] = F.normalize(torch.randn(shape, generator=g), dim=0)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.05
    if mask_token:   # an older retrieval config that kept the ViT's mask token
        for v in ("visual_encoder", "visual_encoder_m"):
            sd[f"{v}.mask_token"] = torch.randn(1, 1, H, generator=g)
    for m in ("", "_m"):
        head = f"text_encoder{m}.cls.predictions."
        if head + "decoder.weight" in sd:
            sd[head + "decoder.weight"] = sd[f"text_encoder{m}.bert.embeddings.word_embeddings.weight"]
            sd[head + "bias"] = sd[head + "decoder.bias"]
    return sd


class _OmegaConfStandIn:
    """Modules named omegaconf.{base,nodes,dictconfig,listconfig} in sys.modules while a file is saved: their classes
    pickle (protocol 2) as a real omegaconf 2.1 DictConfig does, naming the same globals (DictConfig, ListConfig,
    ContainerMetadata, Metadata, AnyNode, typing.Any, builtins dict / list / int, collections.defaultdict)."""

    NAMES = ("omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig")

    def __enter__(self):
        assert not any(n in sys.modules for n in self.NAMES)
        mods = {n: types.ModuleType(n) for n in self.NAMES}
        mods["omegaconf"].__path__ = []

        def cls(module, name):
            c = type(name, (), {"__init__": lambda self, **kw: self.__dict__.update(kw), "__module__": module})
            setattr(mods[module], name, c)
            return c

        Metadata, ContainerMetadata = cls("omegaconf.base", "Metadata"), cls("omegaconf.base", "ContainerMetadata")
        AnyNode = cls("omegaconf.nodes", "AnyNode")
        DictConfig, ListConfig = cls("omegaconf.dictconfig", "DictConfig"), cls("omegaconf.listconfig", "ListConfig")

        def wrap(value, parent, key):
            meta = dict(ref_type=typing.Any, optional=True, key=key, flags={}, flags_root=False,
                        resolver_cache=collections.defaultdict(dict))
            if isinstance(value, dict):
                node = DictConfig(_metadata=ContainerMetadata(object_type=dict, key_type=typing.Any,
                                                              element_type=typing.Any, **meta), _parent=parent)
                node._content = {k: wrap(v, node, k) for k, v in value.items()}
            elif isinstance(value, list):
                node = ListConfig(_metadata=ContainerMetadata(object_type=list, key_type=int,
                                                              element_type=typing.Any, **meta), _parent=parent)
                node._content = [wrap(v, node, i) for i, v in enumerate(value)]
            else:
                node = AnyNode(_metadata=Metadata(object_type=None, **meta), _parent=parent, _val=value)
            return node

        sys.modules.update(mods)
        self.create = lambda tree: wrap(tree, None, None)
        return self

    def __exit__(self, *exc):
        for n in self.NAMES:
            sys.modules.pop(n, None)


PRETRAIN_CONFIG = {"bert_config": "configs/shared_bert.json", "image_res": 256, "batch_size_train": 64,
                   "vision_width": 768, "embed_dim": 256, "temp": 0.07, "mlm_probability": 0.2, "queue_size": 65536,
                   "momentum": 0.99, "alpha": 0.35, "vit_mask_token": True, "mim_loss_weight": 1.0,
                   "optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02},
                   "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 30, "warmup_epochs": 20},
                   "image_tokenizer_path": "/data/dall_e", "train_file": ["coco.json", "vg.json"]}
RETRIEVAL_CONFIG = {"image_res": 384, "batch_size_train": 32, "queue_size": 65536, "alpha": 0.4, "momentum": 0.995,
                    "k_test": 256, "distill": True, "warm_up": True, "embed_dim": 256, "temp": 0.07,
                    "optimizer": {"opt": "adamW", "lr": 1e-5, "weight_decay": 0.02}}


def official_file(sd: dict, config) -> dict:
    """The official save_obj: model, AdamW state, scheduler dict, config, epoch."""
    first = next(v for v in sd.values() if v.is_floating_point())
    return {"model": sd, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first),
                                                     "exp_avg_sq": torch.zeros_like(first)}},
                                       "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8,
                                                         "weight_decay": 0.02, "amsgrad": False, "params": [0]}]},
            "lr_scheduler": {"t_initial": 30, "warmup_t": 20, "_last_epoch": 29}, "config": config, "epoch": 29}


def save_pretrain_file(path, sd) -> None:
    with _OmegaConfStandIn() as oc:
        torch.save(official_file(sd, oc.create(PRETRAIN_CONFIG)), path)
    assert "omegaconf" not in sys.modules and "omegaconf.dictconfig" not in sys.modules


def _run(argv, capsys):
    rc = cc.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _load(path):
    from models.weights import load_weights

    sd, meta = load_weights(str(path))
    return sd, {k: json.loads(v) if k in ("config", "dropped", "new", "epoch") else v for k, v in meta.items()}


def expected_value(name: str, src: torch.Tensor) -> torch.Tensor:
    if name == "temp":
        return torch.tensor([math.log(1 / float(src))], dtype=torch.float32)
    if name in ("image_queue", "text_queue"):
        return src.float().T
    return src.float() if src.is_floating_point() else src


def check_values(src: dict, out: dict, pretrain: bool) -> None:
    for name, dest in destinations(src, pretrain).items():
        for k in dest:
            want, got = expected_value(name, src[name]), out[k]
            assert got.shape == want.shape and got.dtype == want.dtype, (name, k)
            if name == "temp":
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            else:
                assert torch.equal(got, want), (name, k)
    for k in NEW[:2]:
        assert torch.equal(out[k], out[k.replace("momentum.copies.", "")])   # copies of the online tensors
    assert out["vision.temporal_embed"].shape == (1, 8, H)


@pytest.fixture(scope="module")
def pretrain_import(tmp_path_factory):
    d = tmp_path_factory.mktemp("simla")
    sd = official_state_dict("pretrain")
    ckpt, out = d / "simla_4m.pth", d / "simla_4m.safetensors"
    save_pretrain_file(ckpt, sd)
    with pytest.raises(Exception):   # the file really needs more than weights_only (its OmegaConf config)
        torch.load(ckpt, weights_only=True)
    return {"src": sd, "ckpt": ckpt, "out": out, "dir": d}


# --------------------------------------------------------------------------------------------------- (2) pretraining
def test_pretraining_file_end_to_end(pretrain_import, capsys):
    p = pretrain_import
    rc, stdout, err = _run(["import", "--format", "simla", p["ckpt"], p["out"]], capsys)
    assert rc == 0, err
    assert "omegaconf" not in sys.modules   # stubbed, never imported
    sd, meta = _load(p["out"])
    assert meta["kind"] == "vlp" and meta["format_in"] == "simla-pretrain" and meta["epoch"] == 29
    want_dropped = ["text_encoder.bert.embeddings.position_ids", "text_encoder.cls.predictions.bias",
                    "text_encoder_m.bert.embeddings.position_ids", "text_encoder_m.cls.predictions.bias"]
    assert meta["dropped"] == sorted(want_dropped) and meta["new"] == NEW
    for k in want_dropped:   # printed, grouped by reason
        assert k in stdout
    assert "dropped 2 tensors (BERT's position-id buffer" in stdout and "checked equal" in stdout
    check_values(p["src"], sd, pretrain=True)

    config = meta["config"]
    m, o = config["model"], config["objectives"]
    assert m["family"] == "single_stream" and m["vision"]["mask_token"] is True and m["vision"]["img_size"] == 256
    assert (m["vision"]["embed_dim"], m["vision"]["depth"], m["vision"]["num_heads"]) == (H, 2, 1)
    assert (m["text"]["hidden_size"], m["text"]["num_layers"], m["text"]["vocab_size"]) == (H, 2, TOK_VOCAB)
    assert list(o) == ["ita", "itm", "xmm_text", "xmm_image", "psl"]
    assert o["ita"]["queue_size"] == Q and o["xmm_text"]["tie_decoder"] is True
    # the file's own config (an OmegaConf object read through stubs): alpha, momentum, mlm_probability
    assert all(o[n]["alpha"] == 0.35 and o[n]["momentum"] == 0.99 for n in ("ita", "xmm_text", "xmm_image", "psl"))
    assert o["xmm_text"]["mask_prob"] == 0.2
    assert o["xmm_image"]["tokenizer"] == DVAE_PATH and "random_tokenizer" not in o["xmm_image"]
    assert config["data"]["image_size"] == 256
    assert os.path.isfile(str(p["out"])[: -len(".safetensors")] + ".yaml")

    # strict load into the model its metadata config builds, and the ITA head's temperature
    model = build_reference(config, MIM, device="cpu")
    model.load_state_dict(sd, strict=True)
    assert model.objectives["xmm_text"].head.decoder.weight is model.text.embeddings.word_embeddings.weight
    model.eval()
    px = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, _, tau = model.itc(torch.randn(2, H), torch.randn(2, H))
        torch.testing.assert_close(tau, p["src"]["temp"], rtol=1e-6, atol=0)
        got = model.embed_image(px[:, None])
    # the image embedding against timm's ViT on the official visual_encoder weights + vision_proj
    import timm

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="", img_size=256,
                            embed_dim=H, depth=2, num_heads=1, mlp_ratio=2.0).eval()
    vit.load_state_dict({k[len("visual_encoder."):]: v for k, v in p["src"].items()
                         if k.startswith("visual_encoder.") and k != "visual_encoder.mask_token"}, strict=True)
    with torch.no_grad():
        cls = vit.forward_features(px)[:, 0]
    want = F.normalize(cls @ p["src"]["vision_proj.weight"].T + p["src"]["vision_proj.bias"], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_to_finetune_leaves_a_backbone_fine_tuning_can_init_from(pretrain_import, tmp_path, capsys):
    p = pretrain_import
    if not p["out"].exists():
        assert _run(["import", "--format", "simla", p["ckpt"], p["out"]], capsys)[0] == 0
    ft = tmp_path / "init.safetensors"
    rc, stdout, err = _run(["to-finetune", p["out"], ft], capsys)
    assert rc == 0, err
    sd, meta = _load(ft)
    config = meta["config"]
    assert list(config["objectives"]) == ["itm"] and config["model"]["heads"] == ["itc", "itm"]
    gone = ("objectives.", "momentum.")
    assert not [k for k in sd if k.startswith(gone)]
    src_sd, _ = _load(p["out"])
    assert sorted(meta["dropped"]) == sorted(k for k in src_sd if k.startswith(gone))

    # a SIMLA retrieval-style fine-tuning model (ITA + ITM, 384 px, no mask token) starts from it
    from train import finetune

    tree = {"model": {**config["model"], "vision": {**config["model"]["vision"], "img_size": 384,
                                                    "mask_token": False}},
            "objectives": {"ita": {"queue_size": Q}, "itm": {}}, "data": {**config["data"], "image_size": 384}}
    model = build_reference(tree, device="cpu")
    info = finetune.load_init(model, str(ft), new_prefixes=("objectives.",), verbose=False)
    assert info["dropped"] == ["vision.mask_token"]
    assert sorted(info["new"]) == sorted(k for k in model.state_dict() if k.startswith("objectives.ita."))
    own = model.state_dict()
    for k in ("text.layers.1.crossattention.self.key.weight", "text.embeddings.word_embeddings.weight",
              "itc.log_inv_temperature", "itm_head.weight"):
        assert torch.equal(own[k], src_sd[k]), k
    assert torch.equal(own["momentum.copies.text.layers.0.output.dense.weight"],
                       src_sd["text.layers.0.output.dense.weight"])   # momentum copies start from the online weights
    assert own["vision.pos_embed"].shape == (1, 577, H)


# --------------------------------------------------------------------------------------------------- (3) retrieval
@pytest.mark.parametrize("mask_token", [False, True])
def test_retrieval_file(mask_token, tmp_path, capsys):
    sd = official_state_dict("retrieval", seed=2, mask_token=mask_token)
    ckpt, out = tmp_path / "simla_coco.pth", tmp_path / "simla_coco.safetensors"
    torch.save(official_file(sd, dict(RETRIEVAL_CONFIG)), ckpt)
    assert torch.load(ckpt, weights_only=True)["config"]["k_test"] == 256   # a plain-data file
    rc, stdout, err = _run(["import", "--format", "simla", ckpt, out, "--tokenizer", "minilm"], capsys)
    assert rc == 0, err
    got, meta = _load(out)
    assert meta["format_in"] == "simla-retrieval"
    assert meta["dropped"] == ["idx_queue", "text_encoder.embeddings.position_ids",
                               "text_encoder_m.embeddings.position_ids"] and meta["new"] == NEW
    check_values(sd, got, pretrain=False)
    config = meta["config"]
    assert list(config["objectives"]) == ["ita", "itm"] and config["objectives"]["ita"]["queue_size"] == Q
    assert config["model"]["vision"]["img_size"] == 384 and config["data"]["image_size"] == 384
    assert config["model"]["vision"]["mask_token"] is mask_token and "tokenizer_view" not in config["data"]
    assert not [k for k in got if k.startswith(("objectives.xmm", "objectives.psl"))]
    model = build_reference(config, device="cpu")
    model.load_state_dict(got, strict=True)
    with torch.no_grad():
        tau = model.itc(torch.randn(1, H), torch.randn(1, H))[2]
    torch.testing.assert_close(tau, sd["temp"], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------- (4) (5) bad input
class RunsAShell:
    """Pickles as a call of os.system (the classic checkpoint payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("payload, named", [(RunsAShell, f"{os.system.__module__}.system"),
                                            (CallsEval, "builtins.eval")])
def test_malicious_pickle_is_refused_and_never_runs(payload, named, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    ckpt, out = tmp_path / "evil.pth", tmp_path / "out.safetensors"
    with _OmegaConfStandIn() as oc:   # beside a real-looking OmegaConf config, so the restricted reader is the one
        obj = official_file(official_state_dict("pretrain"), oc.create(PRETRAIN_CONFIG))
        obj["lr_scheduler"] = payload(marker)
        torch.save(obj, ckpt)
    rc, stdout, err = _run(["import", "--format", "simla", ckpt, out], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and f"refused: the pickle names {named}" in err, err
    assert not marker.exists() and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_malicious_pickle_through_the_real_cli(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt, out = tmp_path / "evil.pth", tmp_path / "out.safetensors"
    torch.save({"model": official_state_dict("retrieval"), "config": RunsAShell(marker), "epoch": 0}, ckpt)
    p = subprocess.run([sys.executable, str(REPO_ROOT / "train" / "convert_checkpoint.py"), "import", "--format",
                        "simla", str(ckpt), str(out)], capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "refused: the pickle names" in p.stderr
    assert not marker.exists() and not out.exists()


def _bad(kind: str):
    sd = official_state_dict("retrieval" if kind == "missing key (retrieval)" else "pretrain")
    if kind == "missing key":
        del sd["text_encoder.bert.encoder.layer.1.crossattention.self.value.bias"]
        return sd, "missing key text_encoder.bert.encoder.layer.1.crossattention.self.value.bias"
    if kind == "missing key (retrieval)":
        del sd["text_proj_m.weight"]
        return sd, "missing key text_proj_m.weight"
    if kind == "missing momentum head":
        del sd["concept_head_m.bias"]
        return sd, "missing key concept_head_m.bias"
    if kind == "wrong shape":
        sd["visual_encoder.blocks.1.attn.qkv.weight"] = torch.zeros(2 * H, H)
        return sd, f"visual_encoder.blocks.1.attn.qkv.weight has shape ({2 * H}, {H}), expected ({3 * H}, {H})"
    if kind == "wrong queue shape":
        sd["text_queue"] = torch.zeros(ITC, Q // 2)
        return sd, f"text_queue has shape ({ITC}, {Q // 2}), expected ({ITC}, {Q})"
    if kind == "unexpected key":
        sd["text_encoder.bert.pooler.dense.weight"] = torch.zeros(H, H)
        return sd, "unexpected key text_encoder.bert.pooler.dense.weight"
    if kind == "untied decoder":
        sd["text_encoder_m.cls.predictions.decoder.weight"] = sd["text_encoder_m.cls.predictions.decoder.weight"] + 1
        return sd, "text_encoder_m.cls.predictions.decoder.weight differs from"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing key", "missing key (retrieval)", "missing momentum head", "wrong shape",
                                  "wrong queue shape", "unexpected key", "untied decoder"])
def test_bad_file_is_one_line_naming_the_key_and_exit_2(kind, tmp_path, capsys):
    sd, want = _bad(kind)
    ckpt, out = tmp_path / "bad.pth", tmp_path / "out.safetensors"
    torch.save(official_file(sd, dict(RETRIEVAL_CONFIG)), ckpt)
    rc, stdout, err = _run(["import", "--format", "simla", ckpt, out], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(ckpt) in err and want in err, err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------- the manifests
# shared/reference/simla_checkpoint/simla_{pretrain,retrieval_coco}_state_dict.tsv, zlib-compressed and base64-encoded
# (`name<TAB>shape<TAB>dtype`, state_dict() order); test_manifest_copy_matches_the_shared_reference checks the copies.
PRETRAIN_TSV_Z = (
    "eNq13e1y2sgSh/HP7LW4KPe8zz2c2lugCCgJxwYcJCdn7/6AvXbsYLC69UzVfkmsGSbqP/VLpbWtods+zGZf7/fLwbu/Ntvlt27x47F77GYuppsU"
    "o0+vPx26/w0Xf/j0+4uH4TCT2WY3pPDXz03/uLxfdLvVft0d5qv7fjHs77rdTG7kJqfyuvSPCx/2/aLbfunWxwtdzNcu3S77u5GbLofV9+dt5w+H"
    "/X/nv7rNt+/D7Ljkxt9IOv43eumXzbKfXfmsL/f71V0/v53v9oetvPmkkQtG778cht38x93Pl49w/jbcqBY+fdRp2bglf9650Z+lv29Oe9/c+P23"
    "9w/zr6vXyvjb7G40654+6LRq5Ar3Lm2adSP/SKKNmuiiJtaoiT5qYo2a6KMm2qiJLmpijJqooybGqIk2ak4bNaeLmrNGzemj5qxRc/qoOW3UnC5q"
    "zhg1p46aM0bNaaPmtVHzuqh5a9S8PmreGjWvj5rXRs3rouaNUfPqqHlj1Lw2akEbtaCLWrBGLeijFqxRC/qoBW3Ugi5qwRi1oI5aMEYtaKMWtVGL"
    "uqhFa9SiPmrRGrWoj1rURi3qohaNUYvqqEVj1KI2akkbtaSLWrJGLemjlqxRS/qoJW3Uki5qyRi1pI5aMkYtaaOWtVHLuqhla9SyPmrZGrWsj1rW"
    "Ri3ropaNUcvqqGVj1LI2akUbtaKLWrFGreijVqxRK/qoFW3Uii5qxRi1oo5aMUataKNWtVGruqhVa9SqPmrVGrWqj1rVRq3qolaNUavqqFVj1Kr6"
    "n3DV7QJR9gvE3DAQQ8dAzC0DMfQMRN00EGXXQKxtA9H3DcTaOBB950DfOtD2DuzNA0v3wN4+sPQP9A0EbQfB3EIw9BDMTYTxXYTTH37E3Xq67Gyv"
    "pwb062d3h2H+1JVdb3bf+lPbeDNs9rvFZt3P5CaK+7cPfXXVr/1hvXj765ebHN37uzzus893Op5j/D7/Wf7THf6+cItGrhxz1/79xf1p0XOLttud"
    "zj/vu/uv8x+P3eGfS18e427TT3XXcWc67TX9RD+X948ddqbn3Sadav84PDwO83W365FzvduPOJk23+P3M5xuddj3PRv9y1tC55v0Jbi0IXS2iV+H"
    "y1tOPx/zxbi2KXbGiV+RzzY1nPOoaHfYduvNcuje38Kzv4qYNjv/68nn21wq6JRtDLeGqdn0IglKuECEC0i4IIQLSrhAhAtMuGCEC0y4oIQLT7iQ"
    "hAtNuHCEC0+4kIRLC8KFJVxaEC484UISLgzhwhAuk0vI1Gx6kRxKuIMIdyDhDiHcoYQ7iHAHE+4wwh1MuEMJdzzhjiTc0YQ7jnDHE+5Iwl0Lwh1L"
    "uGtBuOMJdyThjiHcMYS7ySVkaja9SB4l3EOEe5BwjxDuUcI9RLiHCfcY4R4m3KOEe55wTxLuacI9R7jnCfck4b4F4Z4l3Lcg3POEe5JwzxDuGcL9"
    "5BIyNZtepIASHiDCA0h4QAgPKOEBIjzAhAeM8AATHlDCA094IAkPNOGBIzzwhAeS8NCC8MASHloQHnjCA0l4YAgPDOFhcgmZmk0vUkQJjxDhESQ8"
    "IoRHlPAIER5hwiNGeIQJjyjhkSc8koRHmvDIER55wiNJeGxBeGQJjy0IjzzhkSQ8MoRHhvA4uYRMzaYXKaGEJ4jwBBKeEMITSniCCE8w4QkjPMGE"
    "J5TwxBOeSMITTXjiCE884YkkPLUgPLGEpxaEJ57wRBKeGMITQ3iaXEKmZtOLlFHCM0R4BgnPCOEZJTxDhGeY8IwRnmHCM0p45gnPJOGZJjxzhGee"
    "8EwSnlsQnlnCcwvCM094JgnPDOGZITxPLiFTs+lFKijhBSK8gIQXhPCCEl4gwgtMeMEILzDhBSW88IQXkvBCE144wgtPeCEJLy0ILyzhpQXhhSe8"
    "kIQXhvDCEF4ml5Cp2fQiVZTwChFeQcIrQnhFCa8Q4RUmvGKEV5jwihJeecIrSXilCa8c4ZUnvJKE1xaEV5bw2oLwyhNeScIrQ3hlCK+TS8jUDPif"
    "99nxbELNZxNyQJswE9qEHdEm1Iw2oYe0CTelTegxbcLOaZMGg9oEndQm+Kg2AWe1SYNhbYJOa5Mm49oEntcmTQa2SYOJbYKObBNoZptAQ9vkdnoh"
    "ocoBpYIHt2GT29DRbdDsNnh4Gza9DR/fBs5vwwe4wRPcWoxwY2e48UPcyCluLca4sXPc2gxyoye5tRnl1mKWGzvMjZrmRo1zk+mFhCqnLNXqvp8/"
    "HI63cXUqdP9yD6Nz464fDstd//X0OeO/GJ/toTvx79Xjb92YPXSnWHfPvz9uDv+l1R/c/Z+b/jSg/+17IU4vsf/jHQSvlzy/byKm9597bfXvC87W"
    "bobt4nu3XL8ufbfw9afP615/f7t5v6pIfb/w9YKnhacfn/1osf109WL7wfr3r2M4XnK804thf9ftZnIjV14/cbz0Yd8/vwfheKmL+frF22V/N3rj"
    "5bD6/rz12fs9/I2k43+KxZ+8qeJ0W96+Xn7EG1LOlyg+Q/mOlA+XfvaSlLNF49+S8vFS5T10+nvoNJ+he1PKRys/e1XK+Zqx70r5aOXoP5roIyja"
    "CIo9gmKJoNgjKJYIij6Coo2gmCMohgiKOYKij6DTR9BpI+jsEXSWCDp7BJ0lgk4fQaeNoDNH0Bki6MwRdPoIen0EvTaC3h5Bb4mgt0fQWyLo9RH0"
    "2gh6cwS9IYLeHEGvj2DQRzBoIxjsEQyWCAZ7BIMlgkEfwaCNYDBHMBgiGMwRDPoIRn0EozaC0R7BaIlgtEcwWiIY9RGM2ghGcwSjIYLRHMGoj2DS"
    "RzBpI5jsEUyWCCZ7BJMlgkkfwaSNYDJHMBkimMwRTPoIZn0EszaC2R7BbIlgtkcwWyKY9RHM2ghmcwSzIYLZHMGsj2DRR7BoI1jsESyWCBZ7BIsl"
    "gkUfwaKNYDFHsBgiWMwRLPoIVn0EqzaC1R7BaolgtUewWiJY9RGs2ghWcwSrIYLVHMFq+KdpQ3tE1P0RmdAgEVOHRCa0SMTUIxFDk0TUXRKxt0nE"
    "0icRe6NELJ0SS6tE3yuZ0iyxdUumtEts/RJLw0TfMZnQMjH1TCY0TTRdk92Fxyc+vvCj/V4eRfjdwr/yvMJLE//siYU3f4qnx1xO/e/1ZvetP7Xp"
    "N6enJhabdT+TmyhuttkNKXy27tf+sF68/fWYJzWuff75XsezaHYa/bzK1bVXn1N5XXnxjfS6BxdV+xEnG/nAomI34lSjH1RU7TfxZNoHFJU7MqfT"
    "Z378jqYTTnqOV78pdsaJXwzTo7yazSZ/RYwP847cjvqymB/n1W04+Wsz6YHeS5san+hVbHf9kd5LG6mf6R21kekWUfUjCiYw+4KxLyj7ArEvMPuC"
    "sS84+wKyLzj7ArMvLdgXln3h2ReSfWnBvrDsSxv2hWZf2rAvLdgXln2h2BeKfQHKSdWPKJiD2XcY+w5l30HsO5h9h7HvcPYdyL7D2Xcw+64F+45l"
    "3/HsO5J914J9x7Lv2rDvaPZdG/ZdC/Ydy76j2HcU+w4oJ1U/omAeZt9j7HuUfQ+x72H2Pca+x9n3IPseZ9/D7PsW7HuWfc+z70n2fQv2Pcu+b8O+"
    "p9n3bdj3Ldj3LPueYt9T7HugnFT9iIIFmP2AsR9Q9gPEfoDZDxj7AWc/gOwHnP0Asx9asB9Y9gPPfiDZDy3YDyz7oQ37gWY/tGE/tGA/sOwHiv1A"
    "sR+AclL1IwoWYfYjxn5E2Y8Q+xFmP2LsR5z9CLIfcfYjzH5swX5k2Y88+5FkP7ZgP7LsxzbsR5r92Ib92IL9yLIfKfYjxX4EyknVjyhYgtlPGPsJ"
    "ZT9B7CeY/YSxn3D2E8h+wtlPMPupBfuJZT/x7CeS/dSC/cSyn9qwn2j2Uxv2Uwv2E8t+othPFPsJKCdVP6JgGWY/Y+xnlP0MsZ9h9jPGfsbZzyD7"
    "GWc/w+znFuxnlv3Ms59J9nML9jPLfm7DfqbZz23Yzy3Yzyz7mWI/U+xnoJxU/YiCFZj9grFfUPYLxH6B2S8Y+wVnv4DsF5z9ArNfWrBfWPYLz34h"
    "2S8t2C8s+6UN+4Vmv7Rhv7Rgv7DsF4r9QrFfgHJS9SMKVmH2K8Z+RdmvEPsVZr9i7Fec/QqyX3H2K8x+bcF+ZdmvPPuVZL+2YL+y7Nc27Fea/dqG"
    "/dqC/cqyXyn2K8V+BcpJ1Q8ZtECP6RNuTp+wg/qEmtQn9Kg+4Wb1CT+sT8hpfcKP6xN6Xp80Gdgn8MQ+aTCyT9CZfdJkaJ/AU/uk0dg+wef2SaPB"
    "fdJkcp/Ao/sEm90n2PA+uSWKilURKRs+wA+c4AeP8MNm+OFD/MApfg3G+KFz/BoM8sMn+bUZ5UfP8msxzI+d5tdmnB89z6/VQD9+ol+rkX5tZvrR"
    "Q/24qX7cWD8hiopVUV221X0/fzgcb+jqVPb+5W5G58auGA7LXf/19Fmar8tnu2jP/Xu95iaO2UV7knX3XJOxb4K4tP5SJa6/BePtJWfvwFjtd6vu"
    "YVh875br9+e7eNUHp3j7898Hub7Py2ne7/R/m9vYsw=="
)
RETRIEVAL_TSV_Z = (
    "eNq13f1OG9cWxuG/6bUgi7X29z0cnVuwHJgkPsGYYJO2d38wEBoCxrPW+lWqVDXM3p7Mequn6p683k+b27Ozz9fb1T7pH+vN6su0/H4/3U9nWup5"
    "LSXVl5/up7/2R3+4vvrr+Wfy/JP1zb7mPx5/bXm7vzuT51/5sd7dr66X083l9mq6W1xe75b77bfp5mGhnLfaX7b87cLb7W45bT5NVw8XltY+vHS1"
    "v/z6dPHi9m77v8Wf0/rL1/3Zw5LzdC714a/ZSz+tV7uzDz7r0/X28ttucbG42d5t5JdPmrlg9v6r/f5m8f3bj58foekin5sWPn7UYdm8Jb8/udmf"
    "ZX9uan1uOn//zfXt4vPly2TSRdNzy7rHDzqsmrlCX6XNsm7mb0msURNb1MQbNbFHTbxRE3vUxBo1sUVNnFETc9TEGTWxRk2tUVNb1NQbNbVHTb1R"
    "U3vU1Bo1tUVNnVFTc9TUGTW1Ri1Zo5ZsUUveqCV71JI3asketWSNWrJFLTmjlsxRS86oJWvUsjVq2Ra17I1atkcte6OW7VHL1qhlW9SyM2rZHLXs"
    "jFq2Rq1Yo1ZsUSveqBV71Io3asUetWKNWrFFrTijVsxRK86oFWvUqjVq1Ra16o1atUeteqNW7VGr1qhVW9SqM2rVHLXqjFq1Rq1Zo9ZsUWveqDV7"
    "1Jo3as0etWaNWrNFrTmj1sxRa86oNWvUujVq3Ra17o1at0ete6PW7VHr1qh1W9S6M2rdHLXujFq3Rm1YozZsURveqA171IY3asMetWGN2rBFbTij"
    "NsxRG86oDfP/wjUfF4jxvEDcBwbiODEQ95GBOM4MxHxoIMZTA/EeG4j93EC8BwdiPzmwHx1Yzw78hwee0wP/8YHn/MB+gGA9QXAfITjOENyHCPNP"
    "EQ6/+RlP6/GyN3s9Hjf/vOTxQPZqffNldzgHXu/X25vl+mp3OAoWfT5YPrbgz+3d1fLXf/75aIu+frYnP/HtJg+fPmuL/6z+nu7+e+RxnF504uE8"
    "//36cP3TIex0c7jhxW66/rz4fj/d/X3sXw/7RqF7+TYhd3LYJnQfP1bX9xNxJ08bee9le7+/vd8vrqabXfRuXm0VvB9DWudvZbuny7vtbocF+fhu"
    "8bvyRvrYXvE78of7+G6huwrH/KP9iDvzB/7Ufra7e4BsuttMV+vVfnr9uN78h4B1n7f/XfDhDsdG5tzB9hjCUwmNQShAJQ6oMIBKFFChAJU4oMIB"
    "KgSgwgEqFKCCAioQoAICKgigggIqEKACAyoYoAIDKiigAgEqYUAlDKhEhhSeSmgMSgGqcUCVAVSjgCoFqMYBVQ5QJQBVDlClAFUUUIUAVRBQRQBV"
    "FFCFAFUYUMUAVRhQRQFVCFANA6phQDUypPBUQmNIFKApDmhiAE1RQBMFaIoDmjhAEwFo4gBNFKAJBTRBgCYQ0IQAmlBAEwRoggFNGKAJBjShgCYI"
    "0BQGNIUBTZEhhacSGkOmAM1xQDMDaI4CmilAcxzQzAGaCUAzB2imAM0ooBkCNIOAZgTQjAKaIUAzDGjGAM0woBkFNEOA5jCgOQxojgwpPJXQGAoF"
    "aIkDWhhASxTQQgFa4oAWDtBCAFo4QAsFaEEBLRCgBQS0IIAWFNACAVpgQAsGaIEBLSigBQK0hAEtYUBLZEjhqYTGUClAaxzQygBao4BWCtAaB7Ry"
    "gFYC0MoBWilAKwpohQCtIKAVAbSigFYI0AoDWjFAKwxoRQGtEKA1DGgNA1ojQwpPJTSGRgHa4oA2BtAWBbRRgLY4oI0DtBGANg7QRgHaUEAbBGgD"
    "AW0IoA0FtEGANhjQhgHaYEAbCmiDAG1hQFsY0BYZUngqoTF0CtAeB7QzgPYooJ0CtMcB7RygnQC0c4B2CtCOAtohQDsIaEcA7SigHQK0w4B2DNAO"
    "A9pRQDsEaA8D2sOA9siQwlMJjWFQgI44oIMBdEQBHRSgIw7o4AAdBKCDA3RQgA4U0AEBOkBABwLoQAEdEKADBnRggA4Y0IECOiBARxjQEQZ0RIYU"
    "nkrsj+NiVUQCdBEJVEYk4TYiweqIBOgjErCQSJBGIgEriQTrJBK2lEioViIha4mE6SUStphIqGYioauJhOsmErqcSNh2IqHqiSTeTyTxgiK5CI0q"
    "PpvYMLiSIqKliKopivcUcUVFRFMRWVXEdBWRZUVcWxFcV4T1FaGFRVBjEVxZhHUW4aVFYGsRXlsE9xZhxUVAcxFQXSShUcVnc3oYP9a7Q6Hvr8XR"
    "h++0PXbJUyF1+e27cD9a/c8Fb9au95vl12l19bL01cKXnz6tO9KZvNzM/uLch0vnf3Xu4WL3l+e+t/hERfTDEusX6L5dYvgMYzn5u0tPtZO/WTS/"
    "nvz9pcZnqPZnqJbPsFWUv7fyVEf52zVzS8rfWzn7tyb2CIo1guKPoHgiKP4IiieCYo+gWCMo7giKI4LijqDYI6j2CKo1guqPoHoiqP4IqieCao+g"
    "WiOo7giqI4LqjqDaI5jsEUzWCCZ/BJMngskfweSJYLJHMFkjmNwRTI4IJncEkz2C2R7BbI1g9kcweyKY/RHMnghmewSzNYLZHcHsiGB2RzDbI1js"
    "ESzWCBZ/BIsngsUfweKJYLFHsFgjWNwRLI4IFncEiz2C1R7Bao1g9UeweiJY/RGsnghWewSrNYLVHcHqiGB1R7DaI9jsEWzWCDZ/BJsngs0fweaJ"
    "YLNHsFkj2NwRbI4INncEmz2C3R7Bbo1g90eweyLY/RHsngh2ewS7NYLdHcHuiGB3R7DbIzjsERzWCA5/BIcngsMfweGJ4LBHcFgjONwRHI4IDncE"
    "h+N/TTuOR8R8PiKBAxJxnZBI4IhEXGck4jgkEfMpifiPScRzTiL+gxLxnJR4jkrsZyWRwxLfaUnkuMR3XuI5MLGfmASOTFxnJoFDE8upybwvGP55"
    "4UdvASw3M94DWG6OvAnwzwdZv6j49RLXVxUf+VTblxW/3mT2uxfHln34ysdhEfSVxXO3Ct7PzDe+5m0UvJfZb3rN3cp/P9Y3vOZvFr4nU4KhLzF+"
    "Z6vQa42m/Yg788fc9WbjzH0igXe+23h6JyD67rcbZ+8V+Zcg9H7jO/s5X3Cct9PHbzi+s4f5FcdTe1gfBzCh4EiEQ1cIdIVCV+LoCoeuEOgKia4w"
    "6AqJrnDoCoyuYOgKiq5A6AqMrmDoCo6ugOgKjq7A6AqGrgDoCoCuxAYGTCg4EuXQVQJdpdDVOLrKoasEukqiqwy6SqKrHLoKo6sYuoqiqxC6CqOr"
    "GLqKo6sguoqjqzC6iqGrALoKoKuxgQETCo4kcegmAt1EoZvi6CYO3USgm0h0E4NuItFNHLoJRjdh6CYU3QShm2B0E4ZuwtFNILoJRzfB6CYM3QSg"
    "mwB0U2xgwISCI8kcuplAN1Po5ji6mUM3E+hmEt3MoJtJdDOHbobRzRi6GUU3Q+hmGN2MoZtxdDOIbsbRzTC6GUM3A+hmAN0cGxgwoeBICoduIdAt"
    "FLoljm7h0C0EuoVEtzDoFhLdwqFbYHQLhm5B0S0QugVGt2DoFhzdAqJbcHQLjG7B0C0AugVAt8QGBkwoOJLKoVsJdCuFbo2jWzl0K4FuJdGtDLqV"
    "RLdy6FYY3YqhW1F0K4RuhdGtGLoVR7eC6FYc3QqjWzF0K4BuBdCtsYEBEwqOpHHoNgLdRqHb4ug2Dt1GoNtIdBuDbiPRbRy6DUa3Yeg2FN0Godtg"
    "dBuGbsPRbSC6DUe3weg2DN0GoNsAdFtsYMCEgiPpHLqdQLdT6PY4up1DtxPodhLdzqDbSXQ7h26H0e0Yuh1Ft0PodhjdjqHbcXQ7iG7H0e0wuh1D"
    "twPodgDdHhsYMKHgSAaH7iDQHRS6I47u4NAdBLqDRHcw6A4S3cGhO2B0B4buQNEdELoDRndg6A4c3QGiO3B0B4zuwNAdALoDQHfEBgZMKPpHp8FK"
    "KkE6qQQrpRKglUrAWipBeqkELaYSqJlK0GoqAbuphC6nEq6dSth6KqH6qYQuqBKuoUr4iiohO6qEL6kSuqVKuJoqIXqqhCiqkovg2Ig5RQdDllUx"
    "bVVcXRXRV0UWVjGNVWxlFdVZxZZWka1VeG0V2FsFF1dhzVV4dRXYXfUvlFeh7VX/Qn0V3l8FFlghDVZIhZUEx0bMaeZgPi7G/vWSN7XY/wddhpwt"
)
