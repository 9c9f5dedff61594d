"""train/convert_checkpoint.py end to end: a real ZeRO-3 checkpoint of the tiny model (DeepSpeed on CPU, 2 steps),
consolidated, loaded strictly into a fresh model, converted for fine-tuning, exported to timm/transformers; public
weights imported through the CLI; bad input gives exit code 2 and one line naming the file/key."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TINY

from train import convert_checkpoint as cc

TOL = 1e-5


def _batch(tokenizer, n=4, frames=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer([f"a small picture of object {i} on a table number {seed}" for i in range(n)],
                    padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return {"pixel_values": torch.randn(n, frames, 3, size, size, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


class _Loader:
    """Infinite synthetic batches with the loader-state API the engine checkpoints."""

    def __init__(self, tokenizer):
        self.tokenizer, self.i = tokenizer, 0

    def __iter__(self):
        while True:
            self.i += 1
            yield _batch(self.tokenizer, seed=self.i)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def _loss(model_call, batch) -> float:
    torch.manual_seed(1234)  # MLM masking and ITM negatives draw from the RNG: the same draws for both models
    with torch.no_grad():
        return float(model_call(batch)["loss"])


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """2 training steps of the tiny model under ZeRO-3 (fp32), checkpointed; -> run dir, config, loss of the
    trained engine's module on a fixed batch, tokenizer."""
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.config import config_to_dict, load_config
    from train.distributed import init_distributed
    from train.engine import Engine, prepare_ds_config, seed_all

    out = tmp_path_factory.mktemp("z3") / "run"
    cfg = load_config(TINY, ["train.max_steps=2", "train.eval_every=0"])
    ds = prepare_ds_config({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, cfg.train, 1)
    dist = init_distributed()
    seed_all(0)
    tokenizer = load_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.objectives, tokenizer)
    engine = Engine(model, cfg.train, ds, dist, _Loader(tokenizer), str(out), run_config=config_to_dict(cfg))
    engine.train()
    engine.ds.eval()
    loss = _loss(engine.ds, _batch(tokenizer, seed=999))
    engine.close()
    return {"out": out, "config": config_to_dict(cfg), "loss": loss, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def consolidated(zero3_run, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp32") / "model.safetensors")
    assert cc.main(["zero-to-fp32", str(zero3_run["out"] / "checkpoints"), path]) == 0
    return path


def _fresh(config):
    return cc.build_from_config(config).eval()


def test_zero3_checkpoint_converted_gives_the_same_loss(zero3_run, consolidated):
    from models.weights import load_weights

    sd, meta = load_weights(consolidated)
    assert meta["kind"] == "vlp" and meta["zero_stage"] == "3" and meta["step"] == "2"
    config = json.loads(meta["config"])
    assert config["model"] == zero3_run["config"]["model"]
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    model = _fresh(config)
    untrained = _loss(model, _batch(zero3_run["tokenizer"], seed=999))
    model.load_state_dict(sd, strict=True)
    loss = _loss(model, _batch(zero3_run["tokenizer"], seed=999))
    assert abs(loss - zero3_run["loss"]) <= TOL, (loss, zero3_run["loss"])
    assert abs(untrained - zero3_run["loss"]) > 1e-3  # the comparison can fail: fresh weights give another loss


def test_step_dir_and_run_dir_are_accepted_and_agree(zero3_run, consolidated, tmp_path):
    from models.weights import load_weights

    want, _ = load_weights(consolidated)
    out = str(tmp_path / "step.safetensors")
    assert cc.main(["zero-to-fp32", str(zero3_run["out"] / "checkpoints" / "step_2"), out, "--no-verify"]) == 0
    got, _ = load_weights(out)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert cc.resolve_ds_checkpoint(str(zero3_run["out"])) == (str(zero3_run["out"] / "checkpoints"), "step_2")


def test_to_finetune_drops_pretraining_heads_by_name_and_keeps_the_rest(zero3_run, consolidated, tmp_path, capsys):
    from models.weights import load_weights

    src, src_meta = load_weights(consolidated)
    out = str(tmp_path / "ft.safetensors")
    assert cc.main(["to-finetune", consolidated, out, "--num-frames", "1"]) == 0
    sd, meta = load_weights(out)
    expected_drop = sorted(k for k in src if k.startswith("objectives.mlm."))  # the tiny config's MLM head
    assert expected_drop and json.loads(meta["dropped"]) == expected_drop
    assert f"dropped {len(expected_drop)} tensors" in capsys.readouterr().out
    assert set(sd) == set(src) - set(expected_drop)
    assert all(torch.equal(sd[k], src[k]) for k in sd)  # same size, 1 frame: nothing else changes
    config = json.loads(meta["config"])
    assert sorted(config["objectives"]) == ["itc", "itm"]
    model = _fresh(config)
    model.load_state_dict(sd, strict=True)  # the written config builds exactly these keys
    images = _batch(zero3_run["tokenizer"], seed=5)["pixel_values"]
    full = _fresh(json.loads(src_meta["config"]))
    full.load_state_dict(src, strict=True)
    with torch.no_grad():
        assert torch.equal(model.embed_image(images), full.embed_image(images))


def test_to_finetune_new_resolution_and_frames(zero3_run, consolidated, tmp_path):
    from models.weights import load_weights

    out = str(tmp_path / "ft96.safetensors")
    assert cc.main(["to-finetune", consolidated, out, "--image-size", "96", "--num-frames", "6",
                    "--trained-frames", "2"]) == 0
    sd, meta = load_weights(out)
    config = json.loads(meta["config"])
    assert config["model"]["vision"]["img_size"] == 96 and config["model"]["vision"]["max_frames"] == 6
    assert sd["vision.pos_embed"].shape == (1, 1 + 6 * 6, 64) and sd["vision.temporal_embed"].shape == (1, 6, 64)
    src, _ = load_weights(consolidated)
    t = src["vision.temporal_embed"]
    assert torch.allclose(sd["vision.temporal_embed"][0, [0, -1]], t[0, [0, 1]])  # endpoints of the trained rows
    model = _fresh(config)
    model.load_state_dict(sd, strict=True)
    batch = _batch(zero3_run["tokenizer"], frames=6, size=96)
    assert torch.isfinite(torch.tensor(_loss(model, batch)))


def test_to_finetune_drops_the_glscl_mask_token(tmp_path):
    """A GLSCL run (MGSC + MLTC on): MLTC's image mask token goes too, and those objectives leave the config; --drop
    removes the ITM head, and ITM (whose head it is) must be dropped with it."""
    from models.weights import load_weights, save_weights
    from train.config import config_to_dict, load_config

    config = config_to_dict(load_config(TINY, ["objectives.mgsc={weight: 1.0}", "objectives.mltc={weight: 1.0}"]))
    sd = _fresh(config).state_dict()
    save_weights(sd, str(tmp_path / "glscl.safetensors"), {"kind": "vlp", "config": config})
    args = ["to-finetune", str(tmp_path / "glscl.safetensors"), str(tmp_path / "ft.safetensors"), "--drop", "itm_head"]
    assert cc.main(args) == 2   # ITM stays enabled but would lose its head
    assert cc.main(args + ["--drop", "objectives.itm"]) == 0
    out, meta = load_weights(str(tmp_path / "ft.safetensors"))
    dropped = json.loads(meta["dropped"])
    assert "objectives.mltc.mask_token" in dropped and "itm_head.weight" in dropped
    config = json.loads(meta["config"])
    assert sorted(config["objectives"]) == ["itc"] and config["model"]["heads"] == ["itc"]
    assert set(out) == {k for k in sd if not k.startswith(("objectives.mlm.", "objectives.mltc.", "itm_head."))}


def test_export_towers_load_in_timm_and_transformers(zero3_run, consolidated, tmp_path):
    import timm
    from transformers import AutoModel

    from models.weights import load_weights

    sd, meta = load_weights(consolidated)
    model = _fresh(json.loads(meta["config"]))
    model.load_state_dict(sd, strict=True)
    assert cc.main(["export", "--tower", "vision", consolidated, str(tmp_path / "vit")]) == 0
    assert cc.main(["export", "--tower", "text", consolidated, str(tmp_path / "bert")]) == 0
    vit = timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True).eval()
    bert = AutoModel.from_pretrained(str(tmp_path / "bert"), add_pooling_layer=False).eval()
    batch = _batch(zero3_run["tokenizer"], seed=7)
    with torch.no_grad():
        ours_v = model.vision(batch["pixel_values"]).tokens
        ours_t = model.text(batch["input_ids"], batch["attention_mask"])
        theirs_v = vit.forward_features(batch["pixel_values"][:, 0])
        theirs_t = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert (ours_v - theirs_v).abs().max() <= TOL
    real = batch["attention_mask"].bool()
    assert (ours_t - theirs_t)[real].abs().max() <= TOL
    assert os.path.isfile(tmp_path / "bert" / "tokenizer.json")  # the run's tokenizer travels with the text tower


def test_import_through_the_cli_then_export_back(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    from models.text import TextConfig, TextEncoder
    from models.weights import load_strict, load_weights

    torch.manual_seed(0)
    src = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                               vocab_size=100, max_position_embeddings=40)).eval()
    src.save_pretrained(tmp_path / "bert")
    out = str(tmp_path / "text.safetensors")
    assert cc.main(["import", "--format", "hf-bert", str(tmp_path / "bert"), out, "--drop-last-blocks", "1"]) == 0
    sd, meta = load_weights(out)
    assert meta["kind"] == "text" and not any(k.startswith("layers.2.") for k in sd)
    tcfg = json.loads(meta["text_config"])
    assert tcfg["num_layers"] == 2
    ours = TextEncoder(TextConfig(**{**tcfg, "tokenizer": "minilm", "dropout": 0.0})).eval()
    load_strict(ours, sd, "test")
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    src.encoder.layer = src.encoder.layer[:2]  # the reference without its last layer
    with torch.no_grad():
        want = src(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours(ids, mask) - want).abs().max() <= TOL
    assert cc.main(["export", "--tower", "text", out, str(tmp_path / "back")]) == 0
    back = AutoModel.from_pretrained(str(tmp_path / "back"), add_pooling_layer=False).eval()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).last_hidden_state - want).abs().max() <= TOL


def test_import_real_minilm_weights_equal_the_text_tower_loaded_by_transformers(tmp_path):
    """The real all-MiniLM-L6-v2 directory (BertModel with pooler): the imported tower is exactly what TextEncoder
    loads through transformers, and only the pooler (+ a legacy buffer) is dropped."""
    from models.text import TextConfig, TextEncoder, resolve_path
    from models.weights import load_weights

    out = str(tmp_path / "minilm.safetensors")
    assert cc.main(["import", "--format", "hf-bert", resolve_path("minilm"), out]) == 0
    sd, meta = load_weights(out)
    dropped = set(json.loads(meta["dropped"]))
    # the pooler, and the position_ids buffer older transformers versions saved (not a weight)
    assert {"pooler.dense.bias", "pooler.dense.weight"} <= dropped <= {"pooler.dense.bias", "pooler.dense.weight",
                                                                       "embeddings.position_ids"}
    ref = TextEncoder(TextConfig(pretrained="minilm")).state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert json.loads(meta["text_config"])["num_layers"] == 6 and meta["tokenizer"] == resolve_path("minilm")


def test_import_openai_clip_file_records_the_quickgelu_tower(tmp_path):
    from models.weights import load_weights

    width, grid, patch = 128, 2, 8
    sd = {"visual.conv1.weight": torch.randn(width, 3, patch, patch),
          "visual.class_embedding": torch.randn(width), "visual.positional_embedding": torch.randn(1 + grid ** 2, width),
          "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
          "visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width),
          "visual.proj": torch.randn(width, 32), "logit_scale": torch.ones(())}
    b = "visual.transformer.resblocks.0."
    sd.update({b + "attn.in_proj_weight": torch.randn(3 * width, width), b + "attn.in_proj_bias": torch.zeros(3 * width),
               b + "attn.out_proj.weight": torch.randn(width, width), b + "attn.out_proj.bias": torch.zeros(width),
               b + "ln_1.weight": torch.ones(width), b + "ln_1.bias": torch.zeros(width),
               b + "ln_2.weight": torch.ones(width), b + "ln_2.bias": torch.zeros(width),
               b + "mlp.c_fc.weight": torch.randn(4 * width, width), b + "mlp.c_fc.bias": torch.zeros(4 * width),
               b + "mlp.c_proj.weight": torch.randn(width, 4 * width), b + "mlp.c_proj.bias": torch.zeros(width)})
    torch.save(sd, tmp_path / "clip.pt")
    out = str(tmp_path / "vision.safetensors")
    assert cc.main(["import", "--format", "openai-clip", str(tmp_path / "clip.pt"), out]) == 0
    tower, meta = load_weights(out)
    vcfg = json.loads(meta["vision_config"])
    assert "quickgelu" in vcfg["timm_name"] and vcfg["num_heads"] == 2 and vcfg["img_size"] == grid * patch
    assert json.loads(meta["dropped"]) == ["logit_scale", "visual.proj"]
    assert torch.equal(tower["blocks.0.attn.qkv.weight"], sd[b + "attn.in_proj_weight"])


@pytest.mark.parametrize("argv, match", [
    (["import", "--format", "timm-vit", "{tmp}/nothing.pth", "{tmp}/o.safetensors", "--timm-name", "vit_tiny_patch16_224"],
     "nothing.pth: no such file"),
    (["import", "--format", "timm-vit", "{tmp}/vit.pth", "{tmp}/o.safetensors"], "needs --timm-name"),
    (["import", "--format", "timm-vit", "{tmp}/extra.pth", "{tmp}/o.safetensors", "--timm-name",
      "vit_tiny_patch16_224", "--num-heads", "2"], r"unexpected \[blocks.0.attn.extra\]"),
    (["export", "--tower", "text", "{tmp}/vit.pth", "{tmp}/out"], "no `kind` metadata"),
    (["zero-to-fp32", "{tmp}", "{tmp}/o.safetensors"], "not a DeepSpeed checkpoint"),
    (["zero-to-fp32", "{tmp}", "{tmp}/o.pt"], "name it \\*.safetensors"),
    (["import", "--format", "hf-bert", "{tmp}", "{tmp}/o.safetensors"], "no config.json"),
    (["import", "--format", "timm-vit", "{tmp}/deit.pth", "{tmp}/o.safetensors", "--timm-name",
      "deit_tiny_distilled_patch16_224"], "has 'dist_token'"),
])
def test_bad_input_is_exit_2_with_one_line(argv, match, tmp_path, capsys):
    import re

    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                            num_heads=2, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    torch.save({**vit.state_dict(), "blocks.0.attn.extra": torch.zeros(1)}, tmp_path / "extra.pth")
    torch.save({**vit.state_dict(), "dist_token": torch.zeros(1, 1, 32)}, tmp_path / "deit.pth")
    assert cc.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and re.search(match, err), err
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_to_finetune_rejects_a_bad_image_size(consolidated, tmp_path, capsys):
    assert cc.main(["to-finetune", consolidated, str(tmp_path / "x.safetensors"), "--image-size", "70"]) == 2
    assert "not a positive multiple of the patch size 16" in capsys.readouterr().err


def test_script_exit_code_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "train/convert_checkpoint.py", "export", "--tower", "vision",
                        str(tmp_path / "missing.safetensors"), str(tmp_path / "out")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing.safetensors'}: no such file"


def test_imported_vit_is_what_model_vision_pretrained_loads(tmp_path):
    """The pretraining path: `import` a timm ViT, name the file in model.vision.pretrained, build the model."""
    import dataclasses

    import timm

    from models.text import load_tokenizer
    from models.vision import VisionConfig
    from models.vlp import build_model
    from train.config import load_config

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=0).eval()
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    out = str(tmp_path / "vision.safetensors")
    assert cc.main(["import", "--format", "timm-vit", "--timm-name", "vit_tiny_patch16_224", str(tmp_path / "vit.pth"),
                    out]) == 0
    cfg = load_config(TINY)
    vcfg = VisionConfig(timm_name="vit_tiny_patch16_224", img_size=64, depth=2, pretrained=out)
    tok = load_tokenizer(cfg.model.text)
    model = build_model(dataclasses.replace(cfg.model, vision=vcfg), cfg.objectives, tok).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = src.forward_features(x)  # (B, 1 + P, D) after the final norm
        got = model.vision(x[:, None]).tokens
    assert (got - want).abs().max() <= TOL
    # another resolution: the position embeddings are resampled at load, the rest is the same tensor
    bigger = build_model(dataclasses.replace(cfg.model, vision=dataclasses.replace(vcfg, img_size=96)),
                         cfg.objectives, tok)
    assert bigger.vision.pos_embed.shape[1] == 1 + 6 * 6
    assert torch.equal(bigger.vision.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    with pytest.raises(ValueError, match="not a vision-tower file"):
        text_file = str(tmp_path / "t.safetensors")
        from models.weights import save_weights
        save_weights({"x": torch.zeros(1)}, text_file, {"kind": "text"})
        build_model(dataclasses.replace(cfg.model, vision=dataclasses.replace(vcfg, pretrained=text_file)),
                    cfg.objectives, tok)


def test_model_vision_pretrained_drops_the_configured_last_blocks(tmp_path):
    import dataclasses

    import timm

    from models.text import load_tokenizer
    from models.vision import VisionConfig
    from models.vlp import build_model
    from train.config import load_config

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=0)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    out = str(tmp_path / "vision.safetensors")
    assert cc.main(["import", "--format", "timm-vit", "--timm-name", "vit_tiny_patch16_224", str(tmp_path / "vit.pth"),
                    out]) == 0
    cfg = load_config(TINY)
    vcfg = VisionConfig(timm_name="vit_tiny_patch16_224", img_size=64, depth=3, drop_last_blocks=1, pretrained=out)
    model = build_model(dataclasses.replace(cfg.model, vision=vcfg), cfg.objectives, load_tokenizer(cfg.model.text))
    assert len(model.vision.blocks) == 2
    assert torch.equal(model.vision.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(model.vision.norm.weight, src.norm.weight)
