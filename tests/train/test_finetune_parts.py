"""Fine-tuning plumbing: layer-wise LR decay, the best checkpoint, the strict --init load with its report."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.train.conftest import tiny_model_config


def _task_model(**kw):
    from models.tasks.base import TaskModel

    torch.manual_seed(0)
    cfg = tiny_model_config(**kw)
    return TaskModel(cfg, nn.Linear(2 * cfg.fusion.hidden_size, 3))


# ------------------------------------------------------------------------------------------ layer decay
def test_layer_decay_scales_each_tower_layer_and_leaves_the_rest():
    from train.config import TrainConfig
    from train.optim import param_groups

    model = _task_model(vision_depth=3, text_layers=2)
    cfg = TrainConfig(lr=1.0, layer_decay=0.5, lr_multipliers={"head.": 10.0, "vision.blocks.2.": 2.0})
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, cfg):
        for p in g["params"]:
            lr_of[names[id(p)]] = g["lr"]

    def want(name):   # written out: BEiT's rule with 3 vision blocks, 2 text layers
        if name.startswith("vision.blocks."):
            i = int(name.split(".")[2])
            return 0.5 ** (3 - i) * (2.0 if i == 2 else 1.0)
        if name.startswith(("vision.patch_embed", "vision.pos_embed", "vision.cls_token", "vision.temporal_embed")):
            return 0.5 ** 4
        if name.startswith("text.layers."):
            return 0.5 ** (2 - int(name.split(".")[2]))
        if name.startswith("text.embeddings."):
            return 0.5 ** 3
        return 10.0 if name.startswith("head.") else 1.0
    assert lr_of and all(lr == pytest.approx(want(n)) for n, lr in lr_of.items()), \
        [(n, lr, want(n)) for n, lr in lr_of.items() if lr != pytest.approx(want(n))][:3]
    assert lr_of["vision.norm.weight"] == 1.0 and lr_of["fusion.token_type.weight"] == 1.0


# ------------------------------------------------------------------------------------------ best checkpoint
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        loss = (self.w * batch["x"]).pow(2).mean()
        return {"loss": loss, "losses": {"toy": loss}, "stats": {}}


class _Loader:
    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            yield {"x": torch.full((2, 3), float(self.i))}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _engine(out, scores, **train):
    from train.config import TrainConfig
    from train.distributed import init_distributed
    from train.engine import Engine, prepare_ds_config

    cfg = TrainConfig(**{"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 6, "lr": 1e-2, "log_every": 1,
                         "eval_every": 1, "keep_last": 1, "save_every": 1, **train})
    ds = prepare_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1)
    engine = Engine(_Toy(), cfg, ds, init_distributed(), _Loader(), str(out),
                    evaluate=lambda e: {"acc": scores[e.step - 1]}, resume=False)
    engine.keep_best("acc")
    engine.resume()
    return engine


def test_the_best_evaluation_keeps_its_checkpoint_beside_the_latest(tmp_path):
    scores = [0.1, 0.5, 0.3, 0.2, 0.4, 0.45]
    _engine(tmp_path, scores).train()
    ck = tmp_path / "checkpoints"
    with open(ck / "best") as f:
        best = json.load(f)
    assert best["tag"] == "step_2" and best["value"] == 0.5 and best["metric"] == "acc"
    assert sorted(d for d in os.listdir(ck) if d.startswith("step_")) == ["step_2", "step_6"]   # keep_last 1 + best
    assert os.path.exists(ck / "step_2" / "complete.json")
    # resumed with more steps and a better score later: the best moves on, the old one is pruned
    e = _engine(tmp_path, scores + [0.1, 0.9], max_steps=8)
    assert e.best["tag"] == "step_2"   # restored with the progress
    e.train()
    with open(ck / "best") as f:
        assert json.load(f)["tag"] == "step_8"
    assert sorted(d for d in os.listdir(ck) if d.startswith("step_")) == ["step_8"]


# ------------------------------------------------------------------------------------------ --init
def _write_init(path, model, config_model):
    """As `convert_checkpoint.py to-finetune` writes it: the backbone and its heads, no task head."""
    from models.weights import save_weights

    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_weights(sd, str(path), {"kind": "vlp", "config": {"model": config_model}})


def test_init_loads_strictly_reports_new_and_dropped_and_resamples_the_position_embedding(tmp_path, capsys):
    import dataclasses

    from train.finetune import load_init

    src = _task_model()                       # 32 px, 8 px patches: a 4x4 grid
    src_sd = src.state_dict()
    _write_init(tmp_path / "init.safetensors", src, dataclasses.asdict(src.cfg))
    cfg = tiny_model_config()
    cfg.vision.img_size = 48                  # 6x6 grid at the task resolution
    cfg.heads = ["itm"]                       # the file's ITC head is not used: dropped
    from models.tasks.base import TaskModel
    torch.manual_seed(1)
    dst = TaskModel(cfg, nn.Linear(2 * cfg.fusion.hidden_size, 5))   # another head shape: new
    head_before = dst.head.weight.detach().clone()
    report = load_init(dst, str(tmp_path / "init.safetensors"))
    line = capsys.readouterr().out
    assert "new: head.weight, head.bias" in line and "dropped: itc.image_proj.*" in line and "4x4 -> 6x6" in line
    assert sorted(report["new"]) == ["head.bias", "head.weight"]
    assert torch.equal(dst.head.weight, head_before)                       # the task head keeps its init
    assert torch.equal(dst.text.layers[0].attention.self.query.weight, src_sd["text.layers.0.attention.self.query.weight"])
    # the position embedding: class token kept, the 4x4 patch grid resized to 6x6 as timm does (bicubic, antialiased)
    old = src_sd["vision.pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2).float()
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(1, 36, -1)
    assert torch.equal(dst.vision.pos_embed[:, :1], old[:, :1])
    torch.testing.assert_close(dst.vision.pos_embed[:, 1:], want, atol=1e-5, rtol=1e-5)


def test_init_missing_a_backbone_tensor_is_one_config_error(tmp_path):
    import dataclasses

    from train.config import ConfigError
    from train.finetune import load_init

    src = _task_model()
    sd = src.state_dict()
    del sd["fusion.layers.0.text_cross.query.weight" if "fusion.layers.0.text_cross.query.weight" in sd
           else next(k for k in sd if k.startswith("fusion.layers.0."))]
    from models.weights import save_weights
    save_weights(sd, str(tmp_path / "init.safetensors"), {"kind": "vlp", "config": {"model": dataclasses.asdict(src.cfg)}})
    with pytest.raises(ConfigError, match="lacks 1 tensors the model needs, e.g. 'fusion.layers.0."):
        load_init(_task_model(), str(tmp_path / "init.safetensors"))


def test_the_rank_head_starts_from_the_loaded_itm_head_unless_the_file_has_one(tmp_path):
    from models.objectives.itc import ItcConfig
    from models.objectives.itm import ItmConfig
    from models.tasks.retrieval import RankConfig
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.finetune import load_init

    cfg = tiny_model_config()
    tok = load_tokenizer(cfg.text)
    torch.manual_seed(3)
    pre = build_model(cfg, {"itc": ItcConfig(), "itm": ItmConfig()}, tok)
    _write_init(tmp_path / "pre.safetensors", pre, {})
    torch.manual_seed(4)
    ft = build_model(cfg, {"itc": ItcConfig(), "rank": RankConfig()}, tok)
    load_init(ft, str(tmp_path / "pre.safetensors"), new_prefixes=("objectives.",), verbose=False)
    rank = ft.objectives["rank"].rank_output
    assert torch.equal(rank.weight[0], pre.itm_head.weight[1]) and torch.equal(rank.bias, pre.itm_head.bias[1:])
    with torch.no_grad():   # a fine-tuned file holds its own rank head: loaded as it is
        rank.weight.add_(1.0)
    _write_init(tmp_path / "ft.safetensors", ft, {})
    torch.manual_seed(5)
    again = build_model(cfg, {"itc": ItcConfig(), "rank": RankConfig()}, tok)
    load_init(again, str(tmp_path / "ft.safetensors"), new_prefixes=("objectives.",), verbose=False)
    assert torch.equal(again.objectives["rank"].rank_output.weight, rank.weight)
