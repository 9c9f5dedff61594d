"""The engine's extension seams, on a toy model (a linear regression) under real DeepSpeed on CPU: named checkpoint
parts, after-step hooks, the metric loggers and the rank fingerprint on request."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from conftest import TINY


class _Toy(torch.nn.Module):
    """forward(batch) -> the engine's output contract; dropout makes the RNG state matter for exact resume."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch):
        pred = self.lin(torch.nn.functional.dropout(batch["x"], 0.2, self.training)).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        return {"loss": loss, "losses": {"mse": loss}, "stats": {}}


class _Loader:
    """Infinite seeded batches; its position is its state."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.i)
            self.i += 1
            yield {"x": torch.randn(2, 4, generator=g), "y": torch.randn(2, generator=g)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


class _Counter:
    """A toy part: a tensor that an after-step hook increments on applied steps only."""

    def __init__(self):
        self.n = torch.zeros((), dtype=torch.int64)

    def state_dict(self):
        return {"n": self.n.clone()}

    def load_state_dict(self, state):
        self.n = state["n"].clone()

    def after_step(self, engine, applied):
        self.n += int(applied)


def _engine(out, resume=False, evaluate=None, **train):
    from train.config import TrainConfig
    from train.distributed import init_distributed
    from train.engine import Engine, prepare_ds_config, seed_all

    cfg = TrainConfig(**{"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 4, "lr": 1e-2,
                         "warmup_ratio": 0.0, "log_every": 1, **train})
    ds = prepare_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1)
    seed_all(0)
    return Engine(_Toy(), cfg, ds, init_distributed(), _Loader(), str(out), evaluate=evaluate, resume=resume)


def _poison(engine, forward: int):
    """The loss of forward call `forward` (0-based) becomes NaN: that step is skipped."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) - 1 == forward else None
    engine.module.register_forward_hook(hook)


def _with_counter(engine):
    counter = _Counter()
    engine.register_part("counter", counter)
    engine.add_after_step(counter.after_step)
    return counter


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ parts
@pytest.fixture(scope="module")
def counted_runs(tmp_path_factory):
    """The same 4 steps (step 2 skipped) uninterrupted, and stopped after step 2 then resumed in a fresh engine."""
    root = tmp_path_factory.mktemp("parts")
    full = _engine(root / "full")
    _poison(full, 1)
    full_counter = _with_counter(full)
    full.resume()
    full.train()

    cut = _engine(root / "cut")
    _poison(cut, 1)
    _with_counter(cut)
    cut.add_after_step(lambda e, applied: e.step == 2 and e.request_stop())
    cut.resume()
    first = cut.train()

    resumed = _engine(root / "cut")
    counter = _with_counter(resumed)
    tag = resumed.resume()
    result = resumed.train()
    return {"root": root, "full": full, "full_counter": full_counter, "first": first, "tag": tag,
            "resumed": resumed, "counter": counter, "result": result}


def test_a_registered_part_is_saved_and_restored(counted_runs):
    r = counted_runs
    assert r["first"]["stopped"] and r["first"]["saved"] == "step_2" and r["tag"] == "step_2"
    assert int(r["full_counter"].n) == 3   # 4 steps, one skipped
    assert int(r["counter"].n) == int(r["full_counter"].n)
    assert r["resumed"].skipped_steps == 0 and r["result"]["step"] == 4
    for a, b in zip(r["full"].module.parameters(), r["resumed"].module.parameters()):
        assert torch.equal(a, b)   # exact resume: loader, RNG (dropout), optimizer
    full, cut = _metrics(r["root"] / "full"), _metrics(r["root"] / "cut")
    assert [x["step"] for x in cut] == [1, 2, 3, 4]
    assert [x["loss"] for x in cut[2:]] == [x["loss"] for x in full[2:]]


def test_train_state_file_layout(counted_runs):
    path = counted_runs["root"] / "cut" / "checkpoints" / "step_4" / "train_state_rank0.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(state) == ["parts", "step", "world_size"]
    assert state["step"] == 4 and state["world_size"] == 1
    assert list(state["parts"]) == ["progress", "loader", "rng", "counter"]
    assert state["parts"]["progress"] == {"step": 4, "last_eval_step": -1}   # no eval hook: never evaluated
    assert state["parts"]["loader"] == {"i": 4} and int(state["parts"]["counter"]["n"]) == 3


def test_a_part_missing_from_the_checkpoint_is_one_line(counted_runs, tmp_path):
    import shutil
    from train.config import ConfigError
    out = tmp_path / "out"
    shutil.copytree(counted_runs["root"] / "cut", out)
    engine = _engine(out)
    _with_counter(engine)
    engine.register_part("queue", _Counter())
    with pytest.raises(ConfigError) as e:
        engine.resume()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"{out / 'checkpoints' / 'step_4'}: written by a run without 'queue'; use a new --output_dir")


def test_a_part_state_that_does_not_fit_is_one_line(counted_runs, tmp_path):
    import shutil
    from train.config import ConfigError
    from train.engine import FnPart
    out = tmp_path / "out"
    shutil.copytree(counted_runs["root"] / "cut", out)
    engine = _engine(out)

    def refuse(state):
        raise ValueError("counter: saved with another size")
    engine.register_part("counter", FnPart(lambda: {}, refuse))
    with pytest.raises(ConfigError) as e:
        engine.resume()
    assert str(e.value) == (f"resuming {out / 'checkpoints' / 'step_4'}: checkpoint part 'counter': counter: saved "
                            "with another size")


def test_an_unregistered_part_in_the_checkpoint_is_ignored_with_a_warning(counted_runs, tmp_path, capsys):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(counted_runs["root"] / "cut", out)
    engine = _engine(out)   # no counter registered
    capsys.readouterr()
    assert engine.resume() == "step_4" and engine.step == 4
    said = capsys.readouterr().out
    assert "warning:" in said and "ignoring its part 'counter'" in said


def test_part_names_are_unique_and_registered_before_resume(tmp_path):
    engine = _engine(tmp_path / "out")
    engine.register_part("counter", _Counter())
    for name in ("counter", "loader", "rng", "progress"):
        with pytest.raises(ValueError, match="already registered"):
            engine.register_part(name, _Counter())
    with pytest.raises(TypeError, match="state_dict"):
        engine.register_part("bad", object())
    assert engine.resume() is None and engine.resumed_from is None
    with pytest.raises(RuntimeError, match="resume"):
        engine.register_part("late", _Counter())
    with pytest.raises(RuntimeError, match="already ran"):
        engine.resume()


def test_a_part_that_would_not_load_with_weights_only_fails_at_save(tmp_path):
    from train.engine import FnPart
    engine = _engine(tmp_path / "out")
    engine.register_part("numpy", FnPart(lambda: {"a": [1, np.int64(3)]}, lambda s: None))
    engine.resume()
    with pytest.raises(TypeError, match=r"checkpoint part 'numpy'\['a'\]\[1\]: a numpy.int64"):
        engine.save()
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "step_0" / "train_state_rank0.pt")


# ------------------------------------------------------------------------------------------ after-step hooks
def test_after_step_hooks_see_skipped_steps_in_order_before_logging(tmp_path):
    out = tmp_path / "out"
    engine = _engine(out, resume=True)   # hooks may be added after resume
    _poison(engine, 2)
    seen = []

    def first(e, applied):
        seen.append(("first", e.step, applied, len(_metrics(out)) if os.path.exists(out / "metrics.jsonl") else 0))

    engine.add_after_step(first)
    engine.add_after_step(lambda e, applied: seen.append(("second", e.step, applied)))
    engine.train()
    assert seen == [("first", 1, True, 0), ("second", 1, True),
                    ("first", 2, True, 1), ("second", 2, True),
                    ("first", 3, False, 2), ("second", 3, False),   # the poisoned step, counted in e.step
                    ("first", 4, True, 3), ("second", 4, True)]
    assert engine.skipped_steps == 1


# ------------------------------------------------------------------------------------------ loggers
def _evaluate(engine):
    return {"acc": 0.5, "num_samples": 8}


def test_jsonl_only_writes_no_tensorboard_dir(tmp_path):
    _engine(tmp_path / "a", resume=True, evaluate=_evaluate, loggers=["jsonl"], max_steps=2).train()
    _engine(tmp_path / "b", resume=True, evaluate=_evaluate, max_steps=2).train()   # the default: both
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "b" / "tensorboard"))
    for run in ("a", "b"):
        assert [r["step"] for r in _metrics(tmp_path / run)] == [1, 2]
        assert json.loads((tmp_path / run / "eval.json").read_text()) == {"step": 2, "acc": 0.5, "num_samples": 8}
        assert (tmp_path / run / "eval.jsonl").read_text().count("\n") == 1


def test_wandb_requested_but_not_installed_is_a_config_error(tmp_path, monkeypatch):
    from train.config import ConfigError
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError, installed or not
    with pytest.raises(ConfigError, match=r"^train\.loggers: .*pip install wandb"):
        _engine(tmp_path / "out", loggers=["jsonl", "wandb"])


def test_wandb_logger_with_a_stand_in_module(tmp_path, monkeypatch):
    calls = []

    class _Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _Run()

    fake = types.SimpleNamespace(init=init)   # only wandb.init is used (checked by hand against wandb 0.31)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "out"
    _engine(out, resume=True, evaluate=_evaluate, loggers=["jsonl", "wandb"], max_steps=2).train()
    kw = calls[0][1]
    assert (kw["project"], kw["mode"], kw["dir"]) == ("glscl", "offline", str(out / "wandb"))
    assert re.fullmatch(r"[0-9a-f]{8}", kw["id"])
    logs = [c[1:] for c in calls if c[0] == "log"]
    assert [step for step, _ in logs] == [1, 2, 2]
    for step, data in logs[:2]:
        assert {"train/loss", "train/lr", "train/grad_norm"} <= set(data) and "train/step" not in data
    assert logs[2] == (2, {"eval/acc": 0.5, "eval/num_samples": 8})
    assert calls[-1] == ("finish",)
    assert (out / "wandb" / "run_id").read_text().strip() == kw["id"]   # a resumed run continues this W&B run
    calls.clear()
    _engine(out, resume=True, evaluate=_evaluate, loggers=["jsonl", "wandb"], max_steps=3).train()
    assert calls[0][1]["id"] == kw["id"] and calls[0][1]["resume"] == "allow"


def test_wandb_that_cannot_start_is_one_config_error(tmp_path, monkeypatch):
    from train.config import ConfigError

    def init(**kwargs):
        raise RuntimeError("network unreachable\n  (details)")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ConfigError, match=r"^train\.loggers: wandb could not start its run \(RuntimeError: network "
                                          r"unreachable \(details\)\); try train\.wandb\.mode=offline"):
        _engine(tmp_path / "out", loggers=["jsonl", "wandb"], max_steps=1).train()


@pytest.mark.parametrize("loggers, message", [
    ("[jsonl, nope]", "train.loggers: unknown logger 'nope'"),
    ("[tensorboard]", "train.loggers: must include jsonl"),
    ("[jsonl, tensorboard, jsonl]", "train.loggers: a logger is named twice"),
])
def test_bad_logger_lists_are_config_errors(loggers, message):
    from train.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [f"train.loggers={loggers}"])


# ------------------------------------------------------------------------------------------ rank fingerprint
def test_rank_fingerprint_only_on_request(tmp_path, monkeypatch, capsys):
    from train.engine import Engine
    gathers = []
    real = Engine.check_ranks_in_sync

    def counted(self):
        gathers.append(1)
        return real(self)
    monkeypatch.setattr(Engine, "check_ranks_in_sync", counted)
    off = _engine(tmp_path / "off", resume=True, max_steps=1).train()
    assert off["ranks_in_sync"] is None and gathers == []
    capsys.readouterr()
    on = _engine(tmp_path / "on", resume=True, max_steps=1, check_ranks_in_sync=True).train()
    assert on["ranks_in_sync"] is True and gathers == [1]
    assert "ranks in sync: True (parameter fingerprint " in capsys.readouterr().out


def test_finite_check_reads_only_real_elements_of_a_zero3_partition():
    """ZeRO-3 pads the last partitions to an equal size with uninitialised memory: a NaN there is no weight. A
    7-element parameter over 2 ranks: rank 0 holds elements 0-3, rank 1 elements 4-6 plus one padding slot."""
    from train.engine import held_weights

    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 7
    p.ds_tensor = torch.tensor([4.0, 5.0, 6.0, float("nan")])   # rank 1's partition
    assert torch.equal(held_weights(p, 1), torch.tensor([4.0, 5.0, 6.0]))
    p.ds_tensor = torch.tensor([0.0, 1.0, 2.0, 3.0])            # rank 0's: no padding
    assert torch.equal(held_weights(p, 0), p.ds_tensor)
    p.ds_numel, p.ds_tensor = 3, torch.tensor([float("nan")] * 2)   # a rank holding only padding
    assert held_weights(p, 2).numel() == 0
    plain = torch.nn.Parameter(torch.ones(3))
    assert held_weights(plain, 1) is plain
