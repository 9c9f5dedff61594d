"""Config validation, batch rule, CLI errors, LR schedule and parameter groups (no DeepSpeed engine needed)."""
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import torch

from train.config import ConfigError, TrainConfig, build_dataclass, load_config
from train.engine import load_ds_config, prepare_ds_config
from train.optim import build_optimizer, lr_factor

from conftest import REPO_ROOT, TINY


@dataclass
class Inner:
    k: int = 1


@dataclass
class Sample:
    a: float = 1.0
    b: Literal["x", "y"] = "x"
    c: Optional[int] = None
    d: list[int] = field(default_factory=list)
    e: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_converter_accepts_and_converts():
    s = build_dataclass(Sample, {"a": 2, "b": "y", "c": 3, "d": [1, 2], "e": {"p": 1}, "inner": {"k": 5},
                                 "flag": True})
    assert s.a == 2.0 and isinstance(s.a, float) and s.e == {"p": 1.0} and s.inner.k == 5
    assert build_dataclass(Sample, {"a": "1e-4"}).a == 1e-4   # YAML 1.1 reads 1e-4 as a string


@pytest.mark.parametrize("raw, message", [
    ({"zz": 1}, "zz: unknown key"),
    ({"a": "abc"}, "a: expected float, got 'abc'"),
    ({"b": "z"}, "b: expected one of 'x', 'y', got 'z'"),
    ({"c": 1.5}, "c: expected int, got 1.5"),
    ({"d": [1, "q"]}, "d[1]: expected int, got 'q'"),
    ({"inner": {"k": True}}, "inner.k: expected int, got True"),
    ({"inner": {"j": 1}}, "inner.j: unknown key"),
    ({"flag": "yes"}, "flag: expected bool"),
])
def test_converter_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        build_dataclass(Sample, raw)
    assert str(e.value).startswith(message)


def test_load_config_error_names_file_and_dotted_key():
    with pytest.raises(ConfigError, match=r"^.*tiny_test\.yaml: train\.lr: expected float, got 'abc'$"):
        load_config(TINY, ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"tiny_test\.yaml: model\.vision\.depthh: unknown key"):
        load_config(TINY, ["model.vision.depthh=3"])
    with pytest.raises(ConfigError, match=r"objectives\.foo: unknown objective"):
        load_config(TINY, ["objectives.foo={weight: 1.0}"])
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config("nope.yaml")


def test_overrides_and_defaults():
    cfg = load_config(TINY, ["train.lr=0.5", "train.lr_multipliers={text.: 0.1}", "objectives.itc.weight=2"])
    assert cfg.train.lr == 0.5 and cfg.train.lr_multipliers == {"text.": 0.1}
    assert cfg.objectives["itc"].weight == 2.0
    assert cfg.train.output_dir == os.path.join("runs", "tiny_test")


def test_batch_rule():
    t = TrainConfig(micro_batch_size=4, global_batch_size=32)
    ds = prepare_ds_config({}, t, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_allow_untested_optimizer"]
    with pytest.raises(ConfigError, match="not a multiple"):
        prepare_ds_config({}, TrainConfig(micro_batch_size=4, global_batch_size=30), world_size=2)
    with pytest.raises(ConfigError, match="train_batch_size is 64 but the run config needs 32"):
        prepare_ds_config({"train_batch_size": 64}, t, world_size=2)
    with pytest.raises(ConfigError, match='remove the "optimizer" block'):
        prepare_ds_config({"optimizer": {"type": "AdamW"}}, t, world_size=1)


@pytest.mark.parametrize("name", sorted(os.listdir(REPO_ROOT / "ds_configs")))
def test_shipped_ds_configs_load_and_pass_batch_check(name):
    ds = prepare_ds_config(load_ds_config(str(REPO_ROOT / "ds_configs" / name)),
                           TrainConfig(micro_batch_size=8, global_batch_size=64), world_size=8)
    assert ds["gradient_accumulation_steps"] == 1
    assert not (ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"))
    assert "zero_optimization" in ds


def test_missing_or_bad_ds_config(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        load_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_ds_config(str(bad))


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train" / "pretrain.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_errors_are_one_line_before_any_work(tmp_path):
    out = tmp_path / "run"
    base = ["--deepspeed_config", "ds_configs/cpu_demo.json", "--config", TINY, "--output_dir", str(out)]
    r = _cli(*base, "train.lrr=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {TINY}: train.lrr: unknown key (allowed: "
                                             + r.stderr.split("(allowed: ", 1)[1].strip()]
    r = _cli(*base, "train.global_batch_size=10")            # 10 is not a multiple of micro 4
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "global_batch_size" in r.stderr
    r = _cli("--deepspeed_config", "ds_configs/missing.json", "--config", TINY)
    assert r.returncode == 2 and r.stderr.strip() == "error: ds_configs/missing.json: DeepSpeed config not found"
    assert not out.exists()


@pytest.mark.parametrize("override, match", [
    ("model.vision.pretrained=nowhere/vit.safetensors", r"model\.vision\.pretrained: no such file 'nowhere/vit"),
    ("model.text.pretrained=nowhere/roberta", r"model\.text\.pretrained: no such directory 'nowhere/roberta'"),
    ("data.mlm_probability=0.2", r"data\.mlm_probability=0\.2 disagrees with objectives\.mlm\.mask_prob=0\.15"),
])
def test_run_inputs_are_checked_before_any_work(override, match):
    from train.pretrain import prepare
    with pytest.raises(ConfigError, match=match):
        prepare(["--deepspeed_config", "ds_configs/cpu_demo.json", "--config", TINY, override])


def test_lr_schedule():
    t = TrainConfig(max_steps=100, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[99] >= 0.1 and f[99] < 0.11
    lin = TrainConfig(max_steps=10, warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.0)
    assert [round(lr_factor(s, lin), 3) for s in (0, 5)] == [1.0, 0.5]


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Linear(4, 4)
        self.text = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(3, 3))

    def no_weight_decay(self):
        return {"scale"}


def test_param_groups_decay_and_multipliers():
    t = TrainConfig(lr=1.0, weight_decay=0.1, lr_multipliers={"text.": 0.5, "text.weight": 0.25})
    opt = build_optimizer(_Toy(), t)
    got = sorted((g["weight_decay"], g["lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups)
    # decayed: vision.weight (lr 1), text.weight (longest prefix: 0.25); no decay: biases, `scale`
    assert got == sorted([(0.1, 1.0, 16), (0.1, 0.25, 16), (0.0, 1.0, 4 + 9), (0.0, 0.5, 4)])
    with pytest.raises(ConfigError, match="lr_multipliers.nothing.: prefix matches no trainable parameter"):
        build_optimizer(_Toy(), TrainConfig(lr_multipliers={"nothing.": 2.0}))


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO_ROOT, "train", "configs")) if n.endswith(".yaml")))
def test_shipped_run_configs_validate(name):
    cfg = load_config(os.path.join(REPO_ROOT, "train", "configs", name))
    # every preset's batch rule holds on 8 ranks (paper presets) or on 1 (demo/tests)
    world = 8 if cfg.train.global_batch_size >= 8 * cfg.train.micro_batch_size else 1
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0
    assert cfg.objectives, name
