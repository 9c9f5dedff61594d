"""`convert_checkpoint.py import --format scl|meter` and `export --format scl`: the released SCL/GLSCL (and METER)
checkpoints <-> our VLPModel.

Official files are synthesised from the released GLSCL file's manifest (scl_manifest.py; scl_fixtures.py shrinks it
to small widths and wraps it as Lightning 1.x/2.x would). Where each tensor must land is a table written out here, not
the importer's own rules; what the imported model computes is checked against a small re-implementation of the
official layer equations (plain torch on the official-named weights, transformers' RobertaModel for the text tower).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import scl_fixtures as fx
import scl_manifest
from conftest import REPO_ROOT
from train import convert_checkpoint as cc
from train import scl_format

V = "vision_transformer.visual."
METER_V = "vit_model.visual."
TOL = 1e-5


# --------------------------------------------------------------------------------------------------- the naming table
_TEXT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
_CROSS_LAYER = {"attention.self.query": "self_attn.q", "attention.self.key": "self_attn.k",
                "attention.self.value": "self_attn.v", "attention.output.dense": "self_out",
                "attention.output.LayerNorm": "self_norm", "crossattention.self.query": "cross_attn.q",
                "crossattention.self.key": "cross_attn.k", "crossattention.self.value": "cross_attn.v",
                "crossattention.output.dense": "cross_out", "crossattention.output.LayerNorm": "cross_norm",
                "intermediate.dense": "ffn.0", "output.dense": "ffn.2", "output.LayerNorm": "ffn_norm"}
_CLIP_BLOCK = {"ln_1": "norm1", "attn.out_proj": "attn.proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}


def destinations(n_text, n_blocks, n_fusion, n_decoder, temperature="itc.temperature", vision=V) -> dict:
    """official key -> our key (None: dropped by name), written out from the naming scheme in
    shared/reference/scl_checkpoint/README.md. n_decoder: blocks of the (dropped) MAE decoder."""
    t = {"cl_temp": temperature, "text_transformer.embeddings.position_ids": None,
         "vision_transformer.mask_token": None, "vision_transformer.decoder_pos_embed": None,
         vision + "class_embedding": "vision.cls_token", vision + "positional_embedding": "vision.pos_embed",
         vision + "conv1.weight": "vision.patch_embed.proj.weight",
         vision + "visual_mask_token": "objectives.mltc.mask_token",
         "token_type_embeddings.weight": "fusion.token_type.weight",
         "mlm_score.decoder.weight": "objectives.mlm.head.decoder.weight",
         "mlm_score.bias": "objectives.mlm.head.decoder.bias"}
    for e in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
              "LayerNorm.weight", "LayerNorm.bias"):
        t[f"text_transformer.embeddings.{e}"] = f"text.embeddings.{e}"
    for p in ("weight", "bias"):
        t[f"{vision}ln_pre.{p}"] = f"vision.norm_pre.{p}"
        t[f"{vision}ln_post.{p}"] = f"vision.norm.{p}"
        t[f"text_transformer.pooler.dense.{p}"] = None
        for m in ("decoder_embed", "decoder_norm", "decoder_pred"):
            t[f"vision_transformer.{m}.{p}"] = None
        for i in range(n_decoder):
            for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                t[f"vision_transformer.decoder_blocks.{i}.{m}.{p}"] = None
        for i in range(n_blocks):
            t[f"{vision}transformer.resblocks.{i}.attn.in_proj_{p}"] = f"vision.blocks.{i}.attn.qkv.{p}"
            for a, b in _CLIP_BLOCK.items():
                t[f"{vision}transformer.resblocks.{i}.{a}.{p}"] = f"vision.blocks.{i}.{b}.{p}"
        for i in range(n_text):
            for a in _TEXT_LAYER:
                t[f"text_transformer.encoder.layer.{i}.{a}.{p}"] = f"text.layers.{i}.{a}.{p}"
        for s in ("text", "image"):
            t[f"cross_modal_{s}_transform.{p}"] = f"fusion.{s}_in.{p}"
            t[f"cross_modal_{s}_pooler.dense.{p}"] = f"fusion.{s}_pooler.0.{p}"
            for i in range(n_fusion):
                for a, b in _CROSS_LAYER.items():
                    t[f"cross_modal_{s}_layers.{i}.{a}.{p}"] = f"fusion.layers.{i}.{s}.{b}.{p}"
        for j in (0, 1, 3):
            t[f"vision_proj.{j}.{p}"] = f"itc.image_proj.{j}.{p}"
            t[f"language_proj.{j}.{p}"] = f"itc.text_proj.{j}.{p}"
        t[f"itm_score.fc.{p}"] = f"itm_head.{p}"
        t[f"mlm_score.transform.dense.{p}"] = f"objectives.mlm.head.transform.0.{p}"
        t[f"mlm_score.transform.LayerNorm.{p}"] = f"objectives.mlm.head.transform.2.{p}"
    return t


def expected_value(key: str, src: torch.Tensor, dest: str) -> torch.Tensor:
    """The official tensor as our model holds it (fp32; CLIP's class embedding / position table / mask token gain the
    leading dims timm's and our layout use; cl_temp becomes log(1/tau) for the log parameterization)."""
    x = src.float()
    if key.endswith(("class_embedding", "visual_mask_token")):
        return x.reshape(1, 1, -1)
    if key.endswith("positional_embedding"):
        return x[None]
    if key == "cl_temp":
        t = float(x)
        return torch.tensor([t if dest == "itc.temperature" else -math.log(t)], dtype=torch.float32)
    return x


def check_destinations(src: dict, out: dict, table: dict, dropped: list, exact: bool = True) -> None:
    """Every official tensor is where the table says (bit-exact unless `exact` is False: the log temperature)."""
    assert set(src) == set(table), sorted(set(src) ^ set(table))[:5]
    assert sorted(dropped) == sorted(k for k, d in table.items() if d is None)
    for key, dest in table.items():
        if dest is None:
            continue
        want = expected_value(key, src[key], dest)
        got = out[dest]
        assert got.dtype == torch.float32 and got.shape == want.shape, (key, dest, got.shape, want.shape)
        if exact or key != "cl_temp":
            assert torch.equal(got, want), (key, dest)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the packed attention input: rows [0, D) are the queries, [D, 2D) the keys, [2D, 3D) the values, as in
    # nn.MultiheadAttention; timm's qkv Linear splits them the same way (checked by the forward test below)
    for key in [k for k in table if k.endswith("attn.in_proj_weight")]:
        w, d = src[key].float(), src[key].shape[1]
        q, k, v = out[table[key]][:d], out[table[key]][d:2 * d], out[table[key]][2 * d:]
        assert torch.equal(q, w[:d]) and torch.equal(k, w[d:2 * d]) and torch.equal(v, w[2 * d:])


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return fx.write_tokenizer(tmp_path_factory.mktemp("tok") / "roberta_tiny")


@pytest.fixture(scope="module")
def shrunk():
    rows = fx.shrunk_rows()
    return rows, fx.random_state_dict(rows, seed=0)


def _run(argv, capsys):
    rc = cc.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _load(path):
    """-> (state dict, metadata with its JSON entries parsed)."""
    from models.weights import load_weights

    sd, meta = load_weights(str(path))
    return sd, {k: json.loads(v) if k in ("config", "dropped", "new", "text_hf_config") else v
                for k, v in meta.items()}


def _preset_with(tmp_path, preset: str, **model_itc) -> str:
    """A copy of a preset with model.itc entries changed (the log temperature parameterization)."""
    import yaml

    with open(os.path.join(REPO_ROOT, "train", "configs", preset)) as f:
        tree = yaml.safe_load(f)
    tree["model"]["itc"].update(model_itc)
    path = tmp_path / f"custom_{preset}"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def glscl_import(tmp_path_factory, shrunk, tokenizer_dir):
    """A shrunk GLSCL file in Lightning 1.x form imported with the default preset, with the detectors armed: the
    helper module the pickle names is importable (tests/train is on sys.path) but not imported, and importing it or
    rebuilding its objects appends to a log file."""
    rows, sd = shrunk
    d = tmp_path_factory.mktemp("glscl")
    ckpt, out, log = d / "GLSCL-100k.ckpt", d / "glscl.safetensors", d / "fake_lightning.log"
    torch.save(fx.lightning1(sd, fx.hp_config()), ckpt)
    sys.modules.pop("scl_fake_lightning", None)   # tests/train stays on sys.path: an ordinary unpickler would import it
    os.environ["SCL_FAKE_LIGHTNING_LOG"] = str(log)
    try:
        rc = cc.main(["import", "--format", "scl", str(ckpt), str(out), "--tokenizer", tokenizer_dir])
        imported_module = "scl_fake_lightning" in sys.modules
        logged = log.read_text() if log.exists() else ""
        # control: an ordinary unpickler does run the helper, so the detector above can see it (the test's own file:
        # deliberately the one unrestricted load here)
        torch.load(ckpt, weights_only=False)
        control = log.read_text() if log.exists() else ""
    finally:
        os.environ.pop("SCL_FAKE_LIGHTNING_LOG", None)
    return {"rc": rc, "ckpt": ckpt, "out": out, "dir": d, "src": sd, "rows": rows, "logged": logged,
            "imported_module": imported_module, "control": control}


# --------------------------------------------------------------------------------------------------- import: layout
def test_manifest_copy_matches_the_shared_reference():
    shared = REPO_ROOT.parent / scl_manifest.SHARED_PATH
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    assert shared.read_text() == scl_manifest.TSV


def test_full_size_manifest_lands_where_the_naming_scheme_says(tokenizer_dir):
    """All 786 keys at full size (constant views: no memory), against the glscl_4m model built on the meta device."""
    rows = fx.full_rows()
    assert len(rows) == 786 and sum(math.prod(s) for _, s, _ in rows) == 386_637_406
    src = fx.constant_state_dict(rows)
    hp = fx.hp_config(num_heads=12)
    imported, config = scl_format.import_state_dict(src, hp, {}, "GLSCL-100k.ckpt", None, tokenizer_dir)
    table = destinations(n_text=12, n_blocks=11, n_fusion=6, n_decoder=8)   # CLIP ViT-B/16 minus its last block
    out = imported.state_dict
    assert set(src) == set(table)
    assert sorted(imported.dropped) == sorted(k for k, v in table.items() if v is None)
    assert len(imported.dropped) == 107   # 104 MAE decoder + 2 text pooler + position_ids
    assert imported.new == ["vision.temporal_embed"] and not out["vision.temporal_embed"].any()
    assert set(out) == {v for v in table.values() if v} | {"vision.temporal_embed"}
    for i, (key, shape, _) in enumerate(rows):
        dest = table[key]
        if dest is None:
            continue
        want = expected_value(key, torch.zeros(shape), dest).shape
        assert out[dest].shape == want, (key, dest)
        if key != "cl_temp":
            assert float(out[dest].reshape(-1)[0]) == i + 1 and float(out[dest].reshape(-1)[-1]) == i + 1, key
    assert float(out["itc.temperature"]) == 1.0   # cl_temp is entry 0 (value 1.0) and the preset's ITC is raw
    m = config["model"]
    assert (m["vision"]["img_size"], m["vision"]["depth"], m["vision"]["drop_last_blocks"]) == (288, 12, 1)
    assert m["text"] | {"tokenizer": None} == {
        "pretrained": None, "tokenizer": None, "arch": "roberta", "hidden_size": 768, "num_layers": 12,
        "num_heads": 12, "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 512,
        "dropout": 0.1}
    assert (m["fusion"]["num_layers"], m["fusion"]["num_heads"], m["itc"]["embed_dim"]) == (6, 12, 512)
    assert list(config["objectives"]) == ["itc", "itm", "mlm", "mgsc", "mltc"]


def test_lightning1_file_imports_without_running_anything_it_names(glscl_import, tokenizer_dir, capsys):
    r = glscl_import
    assert r["rc"] == 0
    assert r["logged"] == "" and not r["imported_module"], r["logged"]
    assert "import" in r["control"] and "setstate" in r["control"] and "reduce payload" in r["control"]
    out, meta = _load(r["out"])
    table = destinations(fx.TEXT_LAYERS, fx.BLOCKS, fx.FUSION_LAYERS, 1)
    check_destinations(r["src"], out, table, meta["dropped"])
    assert meta["kind"] == "vlp" and meta["format_in"] == "scl"
    assert not out["vision.temporal_embed"].any() and out["vision.temporal_embed"].shape == (1, 8, fx.H)
    config = meta["config"]
    assert meta["new"] == ["vision.temporal_embed"]
    assert config["model"]["vision"]["pretrained"] is None and config["model"]["text"]["pretrained"] is None
    assert config["model"]["text"]["tokenizer"] == tokenizer_dir
    assert config["model"]["vision"]["img_size"] == fx.IMG == config["data"]["image_size"]
    assert config["model"]["fusion"]["num_heads"] == fx.FUSION_HEADS   # from hyper_parameters
    assert meta["text_hf_config"]["type_vocab_size"] == 1 and meta["text_hf_config"]["layer_norm_eps"] == 1e-5
    # the usual tools work on it
    rc, stdout, _ = _run(["info", str(r["out"])], capsys)
    assert rc == 0 and "format_in: scl" in stdout and "new (not in the source): vision.temporal_embed" in stdout
    ft = r["dir"] / "ft.safetensors"
    rc, stdout, err = _run(["to-finetune", str(r["out"]), str(ft)], capsys)
    assert rc == 0, err
    kept, _ = _load(ft)
    assert not any(k.startswith(("objectives.mlm.", "objectives.mltc.")) for k in kept) and "itm_head.weight" in kept


def test_lightning2_fp16_file_and_log_temperature(tmp_path, shrunk, tokenizer_dir, capsys):
    """Lightning 2.x wrapper (string callback keys, loops), half-precision weights, our log(1/tau) temperature."""
    rows, _ = shrunk
    src = fx.random_state_dict(rows, seed=1, dtype=torch.float16)
    ckpt, out = tmp_path / "half.ckpt", tmp_path / "half.safetensors"
    torch.save(fx.lightning2(src, fx.hp_config()), ckpt)
    config = _preset_with(tmp_path, "glscl_4m.yaml", parameterization="log")
    rc, stdout, err = _run(["import", "--format", "scl", str(ckpt), str(out), "--tokenizer", tokenizer_dir,
                            "--config", config], capsys)
    assert rc == 0, err
    sd, meta = _load(out)
    table = destinations(fx.TEXT_LAYERS, fx.BLOCKS, fx.FUSION_LAYERS, 1, temperature="itc.log_inv_temperature")
    check_destinations(src, sd, table, meta["dropped"], exact=False)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert float(sd["itc.log_inv_temperature"]) == pytest.approx(-math.log(float(src["cl_temp"])), rel=1e-6)
    # the weights under `model` (the official loader's other accepted form) import the same
    torch.save({"model": src}, tmp_path / "model_key.ckpt")
    rc, _, err = _run(["import", "--format", "scl", str(tmp_path / "model_key.ckpt"), str(tmp_path / "m.safetensors"),
                       "--tokenizer", tokenizer_dir, "--config", config], capsys)
    assert rc == 0, err
    again, _ = _load(tmp_path / "m.safetensors")
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def _meter_state_dict(src: dict) -> dict:
    """The METER layout: vit_model.visual.* vision tower, CLIP text-tower leftovers, no ITC heads / cl_temp / MAE
    decoder / mask token."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for k, v in src.items():
        if k.startswith(("vision_transformer.mask_token", "vision_transformer.decoder", "vision_proj.",
                         "language_proj.")) or k in ("cl_temp", V + "visual_mask_token"):
            continue
        out[k.replace(V, METER_V)] = v
    out.update({"vit_model.token_embedding.weight": torch.randn(49, fx.H, generator=g),
                "vit_model.positional_embedding": torch.randn(77, fx.H, generator=g),
                "vit_model.ln_final.weight": torch.ones(fx.H), "vit_model.ln_final.bias": torch.zeros(fx.H)})
    return out


def test_meter_checkpoint(tmp_path, shrunk, tokenizer_dir, capsys):
    _, src = shrunk
    meter = _meter_state_dict(src)
    ckpt, out = tmp_path / "meter.ckpt", tmp_path / "meter.safetensors"
    hp = {"loss_names": {"itm": 1, "mlm": 1, "mpp": 0, "vqa": 0, "nlvr2": 0, "irtr": 0}, "num_heads": fx.FUSION_HEADS}
    torch.save(fx.lightning2(meter, hp), ckpt)
    rc, stdout, err = _run(["import", "--format", "meter", str(ckpt), str(out), "--tokenizer", tokenizer_dir], capsys)
    assert rc == 0, err
    sd, meta = _load(out)
    table = destinations(fx.TEXT_LAYERS, fx.BLOCKS, fx.FUSION_LAYERS, 1, vision=METER_V)
    for k in ["cl_temp", METER_V + "visual_mask_token"] + [k for k in table if k.startswith(
            ("vision_proj.", "language_proj.", "vision_transformer."))]:
        del table[k]
    for k in ("vit_model.token_embedding.weight", "vit_model.positional_embedding", "vit_model.ln_final.weight",
              "vit_model.ln_final.bias"):
        table[k] = None
    check_destinations(meter, sd, table, meta["dropped"])
    assert meta["format_in"] == "meter" and list(meta["config"]["objectives"]) == ["itm", "mlm"]
    assert "METER's CLIP text-tower leftovers" in stdout
    # --format meter insists on METER's layout
    torch.save({"state_dict": src}, tmp_path / "scl.ckpt")
    rc, _, err = _run(["import", "--format", "meter", str(tmp_path / "scl.ckpt"), str(tmp_path / "o.safetensors"),
                       "--tokenizer", tokenizer_dir], capsys)
    assert rc == 2 and err.count("\n") == 1 and "SCL layout" in err


# --------------------------------------------------------------------------------------------------- bad input
class RunsAShell:
    """Pickles as a call of os.system (the classic checkpoint payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_input(kind: str, src: dict, path):
    sd = dict(src)
    if kind == "missing key":
        del sd["cross_modal_image_layers.1.crossattention.self.key.weight"]
        return fx.lightning2(sd, fx.hp_config()), ("missing key "
                                                   "cross_modal_image_layers.1.crossattention.self.key.weight")
    if kind == "wrong shape":
        sd[V + "transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(2 * fx.H, fx.H)
        return fx.lightning2(sd, fx.hp_config()), (f"{V}transformer.resblocks.1.attn.in_proj_weight has shape "
                                                   f"({2 * fx.H}, {fx.H}), expected ({3 * fx.H}, {fx.H})")
    if kind == "unexpected key":
        sd["cross_modal_text_layers.0.adapter.weight"] = torch.zeros(2)
        return fx.lightning2(sd, fx.hp_config()), "unexpected key cross_modal_text_layers.0.adapter.weight"
    if kind == "os.system":
        ckpt = fx.lightning2(sd, fx.hp_config())
        ckpt["callbacks"] = {"ModelCheckpoint": {"x": RunsAShell(path.parent / "PWNED")}}
        return ckpt, f"refused: the pickle names {os.system.__module__}.system"   # posix.system on Linux
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing key", "wrong shape", "unexpected key", "os.system", "not a checkpoint"])
def test_bad_input_is_one_line_and_exit_2(kind, tmp_path, shrunk, tokenizer_dir, capsys):
    ckpt, out = tmp_path / "in.ckpt", tmp_path / "out.safetensors"
    if kind == "not a checkpoint":
        ckpt.write_text("epoch,loss\n1,0.5\n")
        want = "not a PyTorch checkpoint"
    else:
        obj, want = _bad_input(kind, shrunk[1], ckpt)
        torch.save(obj, ckpt)
    rc, stdout, err = _run(["import", "--format", "scl", str(ckpt), str(out), "--tokenizer", tokenizer_dir], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(ckpt) in err and want in err, err
    assert not out.exists() and not (tmp_path / "PWNED").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no temporary left behind


def test_refused_pickle_through_the_real_cli(tmp_path, shrunk, tokenizer_dir):
    """The same refusal from a fresh process: exit status 2, one stderr line, nothing run or written."""
    ckpt, out = tmp_path / "evil.ckpt", tmp_path / "out.safetensors"
    obj, want = _bad_input("os.system", shrunk[1], ckpt)
    torch.save(obj, ckpt)
    p = subprocess.run([sys.executable, str(REPO_ROOT / "train" / "convert_checkpoint.py"), "import", "--format",
                        "scl", str(ckpt), str(out), "--tokenizer", tokenizer_dir], capture_output=True, text=True,
                       cwd=str(REPO_ROOT), timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and want in p.stderr
    assert not out.exists() and not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------------------------------- the forward
def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)


def _linear(x, sd, p):
    return F.linear(x, sd[p + "weight"], sd.get(p + "bias"))


def _attend(q, k, v, heads, key_mask=None):
    """Multi-head softmax(q k^T / sqrt(d)) v; key_mask (B, Lk) 1 = attend, as BERT's additive -10000 mask."""
    b, lq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)
    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if key_mask is not None:
        s = s + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
    return (s.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def _clip_image(sd, pixels, heads, temporal: bool):
    """OpenAI CLIP's visual tower as SCL runs it: no proj, pre-LN blocks, QuickGELU, packed in_proj, LN eps 1e-5."""
    w = sd[V + "conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd[V + "positional_embedding"]
    if temporal:   # the older video module adds the temporal row of frame 0 to an image's every token
        x = x + sd[V + "temporal_embed"][:, 0]
    x = _ln(x, sd, V + "ln_pre.", 1e-5)
    for i in range(scl_format.count_layers(sd, V + "transformer.resblocks.")):
        r = f"{V}transformer.resblocks.{i}."
        q, k, v = F.linear(_ln(x, sd, r + "ln_1.", 1e-5), sd[r + "attn.in_proj_weight"],
                           sd[r + "attn.in_proj_bias"]).chunk(3, dim=-1)
        x = x + _linear(_attend(q, k, v, heads), sd, r + "attn.out_proj.")
        h = _linear(_ln(x, sd, r + "ln_2.", 1e-5), sd, r + "mlp.c_fc.")
        x = x + _linear(h * torch.sigmoid(1.702 * h), sd, r + "mlp.c_proj.")
    return _ln(x, sd, V + "ln_post.", 1e-5)


def _roberta_text(sd, ids, mask, heads):
    """The text tower: transformers' RobertaModel (roberta-base layout) holding the official text weights."""
    from transformers import RobertaConfig, RobertaModel

    words = sd["text_transformer.embeddings.word_embeddings.weight"]
    layers = scl_format.count_layers(sd, "text_transformer.encoder.layer.")
    cfg = RobertaConfig(vocab_size=words.shape[0], hidden_size=words.shape[1], num_hidden_layers=layers,
                        num_attention_heads=heads,
                        intermediate_size=sd["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
                        max_position_embeddings=sd["text_transformer.embeddings.position_embeddings.weight"].shape[0],
                        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, attn_implementation="eager")
    model = RobertaModel(cfg, add_pooling_layer=False).eval()
    text = {k[len("text_transformer."):]: v for k, v in sd.items()
            if k.startswith("text_transformer.") and not k.startswith(("text_transformer.pooler.",
                                                                        "text_transformer.embeddings.position_ids"))}
    model.load_state_dict(text, strict=True)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _bert_attention(x, ctx, ctx_mask, sd, p, heads):
    a = _attend(_linear(x, sd, p + "self.query."), _linear(ctx, sd, p + "self.key."),
                _linear(ctx, sd, p + "self.value."), heads, ctx_mask)
    return _ln(_linear(a, sd, p + "output.dense.") + x, sd, p + "output.LayerNorm.", 1e-12)


def _cross_layer(x, x_mask, other, other_mask, sd, p, heads):
    """BertCrossLayer: post-LN self-attention, cross-attention to the other stream, exact-GELU FFN; LN eps 1e-12."""
    x = _bert_attention(x, x, x_mask, sd, p + "attention.", heads)
    x = _bert_attention(x, other, other_mask, sd, p + "crossattention.", heads)
    h = F.gelu(_linear(x, sd, p + "intermediate.dense."))
    return _ln(_linear(h, sd, p + "output.dense.") + x, sd, p + "output.LayerNorm.", 1e-12)


def official_forward(sd, ids, mask, pixels, heads, temporal=False):
    """What SCLTransformer.infer / compute_con / itm_score / mlm_score compute, in eval mode."""
    sd = {k: v.float() for k, v in sd.items()}
    text = _linear(_roberta_text(sd, ids, mask, heads["text"]), sd, "cross_modal_text_transform.")
    image = _linear(_clip_image(sd, pixels, heads["vision"], temporal), sd, "cross_modal_image_transform.")
    proj = lambda x, p: _linear(F.gelu(_ln(_linear(x, sd, p + "0."), sd, p + "1.", 1e-5)), sd, p + "3.")
    zt, zi = proj(text[:, 0], "language_proj."), proj(image[:, 0], "vision_proj.")
    itc = (zt / zt.norm(dim=1, keepdim=True)) @ (zi / zi.norm(dim=1, keepdim=True)).T / sd["cl_temp"]
    x, y = text + sd["token_type_embeddings.weight"][0], image + sd["token_type_embeddings.weight"][1]
    image_mask = torch.ones(y.shape[:2])
    for i in range(scl_format.count_layers(sd, "cross_modal_text_layers.")):   # both read the previous layer
        x, y = (_cross_layer(x, mask, y, image_mask, sd, f"cross_modal_text_layers.{i}.", heads["fusion"]),
                _cross_layer(y, image_mask, x, mask, sd, f"cross_modal_image_layers.{i}.", heads["fusion"]))
    cls = torch.cat([torch.tanh(_linear(x[:, 0], sd, "cross_modal_text_pooler.dense.")),
                     torch.tanh(_linear(y[:, 0], sd, "cross_modal_image_pooler.dense."))], -1)
    h = _ln(F.gelu(_linear(x, sd, "mlm_score.transform.dense.")), sd, "mlm_score.transform.LayerNorm.", 1e-12)
    mlm = h @ sd["mlm_score.decoder.weight"].T + sd["mlm_score.bias"]
    return {"text": x, "image": y, "cls_feats": cls, "itc": itc, "itm": _linear(cls, sd, "itm_score.fc."), "mlm": mlm}


def our_forward(model, ids, mask, pixels):
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        image = model.encode_image(pixels[:, None])
        out = model.fuse(text, mask, image)
        zi, zt, tau = model.itc(image.global_, text[:, 0])
        return {"text": out.text, "image": out.image, "cls_feats": out.cls_feats, "itc": zt @ zi.T / tau,
                "itm": model.itm_head(out.cls_feats), "mlm": model.objectives["mlm"].head(out.text)}


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (3, 12), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2   # <s> ... </s>
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 1, 0   # a padded caption (RoBERTa's pad id 1)
    ids[1, 6] = 2
    return ids, mask, torch.randn(3, 3, fx.IMG, fx.IMG, generator=g)


@pytest.mark.parametrize("variant", ["glscl_raw_temperature", "older_mgsc_video_clip_log_temperature"])
def test_imported_model_computes_the_official_forward(variant, tmp_path, shrunk, tokenizer_dir, capsys):
    rows, src = shrunk
    src = dict(src)
    argv = []
    temporal = variant.startswith("older")
    if temporal:   # the first public code's video CLIP module: temporal_embed, no visual_mask_token (maybe msm_temp)
        del src[V + "visual_mask_token"]
        src[V + "temporal_embed"] = 0.1 * torch.randn(1, 8, fx.H, generator=torch.Generator().manual_seed(9))
        src["msm_temp"] = torch.tensor(0.0425)
        argv = ["--config", _preset_with(tmp_path, "scl_4m.yaml", parameterization="log")]
    ckpt, out = tmp_path / "in.ckpt", tmp_path / "out.safetensors"
    torch.save(fx.lightning1(src, fx.hp_config(mltc=not temporal)), ckpt)
    rc, stdout, err = _run(["import", "--format", "scl", str(ckpt), str(out), "--tokenizer", tokenizer_dir] + argv,
                           capsys)
    assert rc == 0, err
    from models.weights import load_strict

    sd, meta = _load(out)
    config = meta["config"]
    assert config["model"]["vision"].get("temporal_embed_images", False) == temporal
    assert set(config["objectives"]) == {"itc", "itm", "mlm", "mgsc"} | ({"mltc"} if not temporal else set())
    if temporal:
        assert "msm_temp" in meta["dropped"]
        assert config["objectives"]["mgsc"]["temperature"] == pytest.approx(0.0425)
    model = cc.build_from_config(config)
    load_strict(model, sd, "test")
    model.eval()
    ids, mask, pixels = _inputs()
    heads = {"text": fx.H // 64, "vision": fx.H // 64, "fusion": fx.FUSION_HEADS}
    want = official_forward(src, ids, mask, pixels, heads, temporal)
    got = our_forward(model, ids, mask, pixels)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------- export
def test_export_writes_the_official_layout_and_round_trips_bit_exactly(glscl_import, tmp_path, capsys):
    r = glscl_import
    exported = tmp_path / "exported.ckpt"
    rc, stdout, err = _run(["export", "--format", "scl", str(r["out"]), str(exported)], capsys)
    assert rc == 0, err
    ckpt = torch.load(exported, map_location="cpu", weights_only=True)   # plain data: no pickled classes
    official = ckpt["state_dict"]
    table = destinations(fx.TEXT_LAYERS, fx.BLOCKS, fx.FUSION_LAYERS, 1)
    written = {k for k, v in table.items() if v is not None}
    assert set(official) == written   # the manifest minus the MAE decoder, text pooler and position ids
    shapes = {name: shape for name, shape, _ in r["rows"]}
    for k, v in official.items():   # the official shapes and the very values the official file had
        assert tuple(v.shape) == shapes[k] and v.dtype == torch.float32 and torch.equal(v, r["src"][k]), k
    hp = ckpt["hyper_parameters"]["config"]
    assert hp["loss_names"] == {"itm": 1, "mlm": 1, "vqa": 0, "nlvr2": 0, "irtr": 0, "mae": 0, "con": 1,
                                     "mgsc": 1, "mltc": 1}
    assert (hp["image_size"], hp["num_top_layer"], hp["num_heads"]) == (fx.IMG, fx.FUSION_LAYERS, fx.FUSION_HEADS)
    assert {"epoch", "global_step", "pytorch-lightning_version"} <= set(ckpt)
    assert "not written either" in stdout and "MAE decoder" in stdout
    back = tmp_path / "back.safetensors"
    rc, _, err = _run(["import", "--format", "scl", str(exported), str(back)], capsys)
    assert rc == 0, err
    a, ma = _load(r["out"])
    b, mb = _load(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ma["config"] == mb["config"]


def _awkward_log_temperature() -> float:
    """A float32 log(1/tau) that does not survive tau = float32(exp(-x)), x' = float32(-log(tau)) (so a plain
    conversion cannot round-trip it)."""
    for i in range(10_000):
        x = torch.tensor(0.7 + i * 1.3e-4, dtype=torch.float32).item()
        tau = torch.tensor(math.exp(-x), dtype=torch.float32).item()
        if torch.tensor(-math.log(tau), dtype=torch.float32).item() != x:
            return x
    raise AssertionError("no awkward value found")


def test_log_temperature_round_trips_bit_exactly(tmp_path, shrunk, tokenizer_dir, capsys):
    from models.weights import save_weights

    rows, src = shrunk
    ckpt, first = tmp_path / "in.ckpt", tmp_path / "first.safetensors"
    torch.save(fx.lightning2(src, fx.hp_config()), ckpt)
    config = _preset_with(tmp_path, "glscl_4m.yaml", parameterization="log")
    rc, _, err = _run(["import", "--format", "scl", str(ckpt), str(first), "--tokenizer", tokenizer_dir,
                       "--config", config], capsys)
    assert rc == 0, err
    sd, meta = _load(first)
    x = _awkward_log_temperature()
    sd["itc.log_inv_temperature"] = torch.tensor([x])
    save_weights(sd, str(first), {k: v for k, v in meta.items() if k != "format"})
    rc, _, err = _run(["export", "--format", "scl", str(first), str(tmp_path / "e.ckpt")], capsys)
    assert rc == 0, err
    rc, _, err = _run(["import", "--format", "scl", str(tmp_path / "e.ckpt"), str(tmp_path / "back.safetensors")],
                      capsys)
    assert rc == 0, err
    back, _ = _load(tmp_path / "back.safetensors")
    assert float(back["itc.log_inv_temperature"]) == x
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------------------- pretrain further
def test_imported_file_pretrains_further_from_its_weights(glscl_import, demo_shards, tmp_path):
    """`import` writes OUT.yaml beside the weights (its run config, train.init_from = the weights): a real pretraining
    run on it starts from exactly the imported tensors and takes optimizer steps."""
    from conftest import data_overrides, read_metrics
    from train import pretrain as entry

    out = glscl_import["out"]
    run_yaml = out.with_suffix(".yaml")
    assert run_yaml.exists()
    imported, _ = _load(out)
    seen = {}

    def hook(engine):   # after the build (and init_from), before the first step
        seen.update({k: v.detach().clone() for k, v in engine.module.state_dict().items()})

    cfg, ds = entry.prepare(["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_demo.json"), "--config",
                             str(run_yaml), "--output_dir", str(tmp_path / "run"), *data_overrides(demo_shards),
                             "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=2",
                             "train.eval_every=0", "data.num_workers=0", "data.shuffle_buffer=10",
                             "train.log_every=1", "data.eval=[]"])
    assert cfg.train.init_from == str(out)
    entry.run(cfg, ds, engine_hook=hook)
    assert set(seen) == set(imported)
    for k, v in imported.items():
        assert torch.equal(seen[k], v), k
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_init_from_refuses_a_file_that_does_not_fit(glscl_import, tmp_path):
    """A missing key or a tower file: one ConfigError naming the file and the key, before any training."""
    from models.weights import load_weights, save_weights
    from train.config import ConfigError, load_config
    from train.pretrain import init_from
    from models.text import load_tokenizer
    from models.vlp import build_model

    cfg = load_config(str(glscl_import["out"].with_suffix(".yaml")))
    model = build_model(cfg.model, cfg.objectives, load_tokenizer(cfg.model.text))
    sd, meta = load_weights(str(glscl_import["out"]))
    del sd["itm_head.bias"]
    bad = tmp_path / "bad.safetensors"
    save_weights(sd, str(bad), meta)
    with pytest.raises(ConfigError, match=r"bad\.safetensors.*itm_head\.bias"):
        init_from(model, str(bad))
    save_weights(sd, str(tmp_path / "tower.safetensors"), {**meta, "kind": "vision"})
    with pytest.raises(ConfigError, match="not a whole-model file"):
        init_from(model, str(tmp_path / "tower.safetensors"))


def test_init_from_fills_missing_momentum_copies_from_the_online_weights(tmp_path):
    """A file without momentum copies (an imported SCL model) into a run with ITA: the copies start as the file's
    online weights, as a fresh build copies its own."""
    from conftest import tiny_model_config
    from models.objectives.ita import ItaConfig
    from models.text import TextConfig, load_tokenizer
    from models.vlp import build_model
    from models.weights import save_weights
    from train.pretrain import init_from

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    cfg = tiny_model_config(width=32, vision_depth=1, text_layers=1, fusion_layers=1, fusion_heads=2)
    torch.manual_seed(1)
    source = build_model(cfg, {"ita": ItaConfig(queue_size=8)}, tok)
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("momentum.")}
    save_weights(sd, str(tmp_path / "m.safetensors"), {"kind": "vlp"})
    torch.manual_seed(2)
    model = build_model(cfg, {"ita": ItaConfig(queue_size=8)}, tok)
    init_from(model, str(tmp_path / "m.safetensors"))
    got = model.state_dict()
    assert torch.equal(got["momentum.copies.vision.pos_embed"], source.state_dict()["vision.pos_embed"])
    assert torch.equal(got["momentum.copies.fusion__image_in.weight"], source.state_dict()["fusion.image_in.weight"])
    assert all(torch.equal(got[k], v) for k, v in sd.items())
