"""Adding an objective is its own file + a registry entry + a config: a toy objective added that way trains through
the real engine, is counted by train/flops.py, and is dropped by `convert_checkpoint.py to-finetune`."""
import json

import pytest
import torch

from conftest import TINY, data_overrides, read_metrics, write_ds_config
from toy_objective import Toy

TOY = "objectives.toy={weight: 1.0, dim: 4}"


@pytest.fixture
def registered(monkeypatch):
    from models.objectives import OBJECTIVES
    monkeypatch.setitem(OBJECTIVES, "toy", Toy)


def test_toy_objective_trains_and_is_dropped_for_finetuning(registered, demo_shards, tmp_path):
    from models.text import load_tokenizer
    from models.vlp import build_model
    from models.weights import load_weights
    from train import convert_checkpoint as cc
    from train import pretrain

    out = tmp_path / "run"
    cfg, ds = pretrain.prepare(["--deepspeed_config", write_ds_config(tmp_path, 1, "fp32"), "--config", TINY,
                                "--output_dir", str(out), "train.max_steps=3", TOY, *data_overrides(demo_shards)])
    pretrain.run(cfg, ds)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss_toy"] > 0 for r in records)

    fp32 = str(tmp_path / "fp32.safetensors")
    assert cc.main(["zero-to-fp32", str(out), fp32]) == 0
    sd, meta = load_weights(fp32)
    torch.manual_seed(cfg.train.seed)   # the run's initial weights (seed_all before building the model)
    init = build_model(cfg.model, cfg.objectives, load_tokenizer(cfg.model.text)).state_dict()
    toy_keys = [k for k in sd if k.startswith("objectives.toy.")]
    assert sorted(toy_keys) == ["objectives.toy.image.bias", "objectives.toy.image.weight",
                                "objectives.toy.text.bias", "objectives.toy.text.weight"]
    assert all(not torch.equal(sd[k], init[k]) for k in toy_keys)   # it received gradients and updates

    ft = str(tmp_path / "ft.safetensors")
    assert cc.main(["to-finetune", fp32, ft]) == 0
    out_sd, out_meta = load_weights(ft)
    assert set(json.loads(out_meta["dropped"])) == {k for k in sd if k.startswith(("objectives.toy.",
                                                                                   "objectives.mlm."))}
    assert not any(k.startswith("objectives.toy.") for k in out_sd)
    assert "toy" not in json.loads(out_meta["config"])["objectives"]

    # A task: the backbone of that file + its own head, no pretraining objective.
    from models.tasks.base import TaskModel
    from train.convert_checkpoint import _parse_model_config
    model_cfg, _ = _parse_model_config(json.loads(out_meta["config"]))
    task = TaskModel(model_cfg, _ToyTaskHead(model_cfg.fusion.hidden_size))
    missing, unexpected = task.load_state_dict(out_sd, strict=False)
    assert unexpected == [] and sorted(missing) == ["head.linear.bias", "head.linear.weight"]
    assert not any(n.startswith(("objectives.", "momentum.")) for n in task.state_dict())
    tok = load_tokenizer(cfg.model.text)
    enc = tok(["a red circle", "a blue square"], padding="max_length", max_length=16, return_tensors="pt")
    out = task({"pixel_values": torch.randn(2, 1, 3, 64, 64), **enc})
    out["loss"].backward()
    assert task.head.linear.weight.grad is not None and task.vision.pos_embed.grad is not None


class _ToyTaskHead(torch.nn.Module):
    """A two-way classifier on the fused CLS features (the shape of an NLVR2/SNLI-VE head)."""

    def __init__(self, dim):
        super().__init__()
        self.linear = torch.nn.Linear(2 * dim, 2)

    def forward(self, backbone, batch):
        from models.objectives.base import ObjectiveOutput
        out = backbone.fuse(backbone.encode_text(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"],
                            backbone.encode_image(batch["pixel_values"]), text_out="cls", image_out="cls")
        logits = self.linear(out.cls_feats)
        return ObjectiveOutput({"cls": torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))})


def test_toy_objective_is_counted_by_flops(registered):
    from train.config import load_config
    from train.flops import count_flops

    res = count_flops(load_config(TINY, [TOY]), batch_size=2, log=lambda *_: None)
    for side in ("ours", "official"):
        assert res[side]["parts"]["toy"] > 0
        assert sum(res[side]["parts"].values()) == pytest.approx(res[side]["total"], rel=1e-9)
    # ours reuses the shared encodings, so the toy's own part is just its two small linear layers (fwd + bwd)
    d, dim = 64, 4
    assert res["ours"]["parts"]["toy"] == pytest.approx(2 * 3 * 2 * d * dim, rel=1e-9)
