"""Issue 9, the engine's side: checkpoints are untrusted input, non-finite steps are skipped and never saved, a
damaged run directory resumes from the newest intact checkpoint, signals to the whole job save, one run per
directory, and a trainer does not outlive its launcher. Real DeepSpeed on CPU, the tiny model, real demo shards."""
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY, data_overrides, read_metrics, write_ds_config

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "DS_SKIP_SHM_OP": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):   # each subprocess is its own job
    ENV.pop(_k, None)
CPU_DS = str(REPO_ROOT / "ds_configs" / "cpu_demo.json")   # ZeRO-0 fp32, no gradient clipping


def _args(demo, out, *overrides, ds=CPU_DS):
    return ["--deepspeed_config", ds, "--config", TINY, "--output_dir", str(out), *data_overrides(demo),
            *overrides]


def _cli(demo, out, *overrides, ds=CPU_DS, timeout=300):
    return subprocess.run([sys.executable, str(REPO_ROOT / "train" / "pretrain.py"), *_args(demo, out, *overrides,
                                                                                           ds=ds)],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _start(demo, out, *overrides, launcher=None):
    cmd = [sys.executable, str(REPO_ROOT / "train" / "pretrain.py")] if launcher is None else launcher
    return subprocess.Popen([*cmd, *_args(demo, out, *overrides)], cwd=REPO_ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(pred, timeout, what, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(out) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(out)]
    except (FileNotFoundError, ValueError):
        return []


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _run(demo, out, *overrides, ds=CPU_DS, hook=None):
    from train import pretrain as entry
    cfg, dsc = entry.prepare(_args(demo, out, *overrides, ds=ds))
    return entry.run(cfg, dsc, engine_hook=hook)


def _module_states(tag_dir: Path) -> dict:
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


# ------------------------------------------------------------------------------------------ untrusted checkpoints
class _Payload:
    """Unpickling this creates a directory: the visible trace of code run from a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture(scope="module")
def two_step_run(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_step") / "out"
    _run(demo_shards, out, "train.max_steps=2")
    return out


@pytest.mark.parametrize("victim", ["train_state_rank0.pt", "mp_rank_00_model_states.pt"])
def test_checkpoint_with_code_is_refused_and_never_run(demo_shards, two_step_run, tmp_path, victim):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_step_run, out)
    path = out / "checkpoints" / "step_2" / victim
    marker = tmp_path / "payload_ran"
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, path)
    # the payload is live: a plain torch.load runs it
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.is_dir()
    marker.rmdir()

    r = _cli(demo_shards, out, "train.max_steps=3")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = _one_error_line(r.stderr)
    assert victim in line and "refused" in line
    assert not marker.exists()
    assert (out / "checkpoints" / "latest").read_text() == "step_2"   # nothing moved, nothing trained
    assert _logged_steps(out) == [1, 2]


def test_everything_we_write_loads_with_weights_only_and_conversion_refuses_code(demo_shards, tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    for stage, precision in ((1, "bf16"), (3, "fp32")):
        ds = write_ds_config(tmp_path, stage, precision)
        out = tmp_path / f"out{stage}"
        _run(demo_shards, out, "train.max_steps=1", ds=ds)
        files = sorted((out / "checkpoints" / "step_1").glob("*.pt"))
        assert len(files) >= 3
        # DeepSpeed's own plain-data classes are the only objects besides tensors and python data
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            for f in files:
                torch.load(f, map_location="cpu", weights_only=True)
    # ZeRO -> fp32 consolidation (DeepSpeed unpickles with weights_only=False) checks every file first
    optim = next((tmp_path / "out3" / "checkpoints" / "step_1").glob("*optim_states.pt"))
    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        state = torch.load(optim, map_location="cpu", weights_only=True)
    marker = tmp_path / "payload_ran"
    state["extra"] = _Payload(str(marker))
    torch.save(state, optim)
    r = subprocess.run([sys.executable, str(REPO_ROOT / "train" / "convert_checkpoint.py"), "zero-to-fp32",
                        str(tmp_path / "out3"), str(tmp_path / "w.safetensors")], cwd=REPO_ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert optim.name in _one_error_line(r.stderr) and not marker.exists()


# ------------------------------------------------------------------------------------------ non-finite steps
class _PoisonStep:
    """Forward hook: the loss of forward call number `at` (0-based) becomes NaN; records a weight fingerprint
    before every forward (ZeRO 0-2 keep full parameters on every rank)."""

    def __init__(self, at):
        self.at, self.calls, self.prints = at, 0, []

    def install(self, engine):
        module = engine.module
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post)

    def pre(self, module, args):
        self.prints.append(sum(p.detach().double().abs().sum().item() for p in module.parameters()))

    def post(self, module, args, out):
        self.calls += 1
        if self.calls - 1 == self.at:
            return {**out, "loss": out["loss"] * float("nan")}
        return None


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32")])
def test_nonfinite_step_is_skipped_and_training_goes_on(demo_shards, tmp_path, stage, precision):
    ds = write_ds_config(tmp_path, stage, precision)
    poison = _PoisonStep(at=2)
    result = _run(demo_shards, tmp_path / "out", "train.max_steps=5", "train.global_batch_size=4", ds=ds,
                  hook=poison.install)
    assert result["step"] == 5 and not result["stopped"]
    p = poison.prints   # p[i]: weights seen by forward i; forward 2 had the NaN loss
    assert p[3] == p[2], "the poisoned step changed the weights"
    assert p[1] != p[0] and p[2] != p[1] and p[4] != p[3], "healthy steps must update the weights"
    records = read_metrics(tmp_path / "out")
    assert records[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 3)
    w = _module_states(tmp_path / "out" / "checkpoints" / "step_5")
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_all(demo_shards, tmp_path, stage):
    """Rank 1's loss value is NaN at step 3 but its gradient is finite, so only the agreed loss check can catch it:
    without the agreement rank 0 would update and rank 1 not, and the ranks would drift apart."""
    ds = write_ds_config(tmp_path, stage, "fp32")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(REPO_ROOT / "tests" / "train" / "rank_poison_entry.py"),
           *_args(demo_shards, tmp_path / "out", "train.max_steps=4", "train.global_batch_size=8", ds=ds)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks in sync: True" in r.stdout
    records = read_metrics(tmp_path / "out")
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert records[-1]["skipped_steps"] == 1 and "step 3: non-finite loss" in r.stdout


def test_divergence_stops_with_one_line_and_never_saves_nan(demo_shards, tmp_path):
    out = tmp_path / "out"
    r = _cli(demo_shards, out, "train.lr=1e6", "train.log_every=5", "train.save_every=2", "train.max_steps=40",
             "train.max_skipped_steps=4")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    line = _one_error_line(r.stderr)
    assert "diverged" in line and "train.max_skipped_steps" in line
    ckpts = out / "checkpoints"
    latest = (ckpts / "latest").read_text()
    tags = sorted(d.name for d in ckpts.iterdir() if d.name.startswith("step_"))
    assert latest in tags
    for tag in tags:   # every checkpoint on disk holds finite weights
        assert all(torch.isfinite(t).all() for t in _module_states(ckpts / tag).values()), tag
    assert "update skipped (4 in a row" in r.stdout


def test_nonfinite_weights_are_never_checkpointed(demo_shards, tmp_path):
    from train.engine import TrainingDiverged

    def hook(engine):   # forward 3 (step 4) finds a weight already NaN, as a bad in-place op would leave it
        calls = []

        def corrupt(module, args):
            calls.append(1)
            if len(calls) == 4:
                next(module.parameters()).data.view(-1)[0] = float("nan")
        engine.module.register_forward_pre_hook(corrupt)

    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="inf/NaN at step 4; not saving"):
        _run(demo_shards, out, "train.max_steps=6", "train.global_batch_size=4", "train.save_every=1",
             "train.keep_last=5", hook=hook)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_3"
    assert sorted(d.name for d in ck.iterdir() if d.name.startswith("step_")) == ["step_1", "step_2", "step_3"]


def test_grad_norm_is_logged_and_right_without_clipping(demo_shards, tmp_path):
    norms, handles = [], []

    def hook(engine):   # independent: square-sum every parameter's gradient as autograd produces it
        acc = {"sq": 0.0}
        for p in engine.module.parameters():
            if p.requires_grad:
                handles.append(p.register_hook(lambda g: acc.__setitem__("sq", acc["sq"] + g.double().pow(2).sum().item())))

        def read(module, args):
            norms.append(math.sqrt(acc["sq"]))
            acc["sq"] = 0.0
        engine.module.register_forward_pre_hook(read)

    _run(demo_shards, tmp_path / "out", "train.max_steps=3", "train.global_batch_size=4", "train.log_every=1",
         hook=hook)
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "out")]
    # norms[i] is the gradient norm of forward i-1, read at forward i; the last step's is not seen by a forward
    assert len(logged) == 3
    assert logged[:2] == pytest.approx(norms[1:3], rel=1e-5)   # ours sums fp32 per-tensor norms


# ------------------------------------------------------------------------------------------ damaged run dirs
@pytest.fixture(scope="module")
def four_step_run(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("four_step") / "out"
    _run(demo_shards, out, "train.max_steps=4", "train.save_every=2", "train.keep_last=3")
    return out


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage,expect_tag", [
    ("latest_missing_tag", "step_4"), ("latest_empty", "step_4"), ("model_states_truncated", "step_2"),
    ("train_state_truncated", "step_2"), ("marker_missing", "step_2")])
def test_damaged_checkpoint_falls_back_to_newest_intact(demo_shards, four_step_run, tmp_path, capsys, damage,
                                                        expect_tag):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(four_step_run, out)
    ck = out / "checkpoints"
    if damage == "latest_missing_tag":
        (ck / "latest").write_text("step_99")
    elif damage == "latest_empty":
        (ck / "latest").write_text("")
    elif damage == "model_states_truncated":
        _truncate(ck / "step_4" / "mp_rank_00_model_states.pt")
    elif damage == "train_state_truncated":
        _truncate(ck / "step_4" / "train_state_rank0.pt")
    elif damage == "marker_missing":
        (ck / "step_4" / "complete.json").unlink()
    (ck / "latest.tmp4242").write_text("step_")               # a writer killed between write and rename
    with open(out / "metrics.jsonl", "a") as f:                # ... and one killed mid-line
        f.write('{"step": 5, "loss": 1.2')
    original = {r["step"]: r for r in read_metrics(four_step_run)}
    capsys.readouterr()
    _run(demo_shards, out, "train.max_steps=4", "train.save_every=2", "train.keep_last=3")
    said = capsys.readouterr().out
    assert f"resumed from {ck / expect_tag}" in said
    if expect_tag != "step_4" or damage.startswith("latest"):
        assert "warning:" in said
    assert not (ck / "latest.tmp4242").exists()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:   # the redone steps equal the original run's, bit for bit (exact resume)
        assert r["loss"] == original[r["step"]]["loss"]


def test_no_intact_checkpoint_after_one_existed_is_refused(demo_shards, two_step_run, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_step_run, out)
    _truncate(out / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt")
    r = _cli(demo_shards, out, "train.max_steps=3")
    assert r.returncode == 2
    assert "no intact checkpoint" in _one_error_line(r.stderr)


def test_kill_before_first_checkpoint_leaves_no_duplicate_log_lines(demo_shards, tmp_path):
    out = tmp_path / "out"
    p = _start(demo_shards, out, "train.max_steps=200", "train.log_every=1", "train.eval_every=0")
    try:
        _wait_for(lambda: len(_logged_steps(out)) >= 2, 240, "two logged steps", p)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (out / "checkpoints" / "latest").exists()
    _run(demo_shards, out, "train.max_steps=3", "train.log_every=1")
    assert _logged_steps(out) == [1, 2, 3]


# ------------------------------------------------------------------------------------------ resume with changes
def test_resume_applies_a_changed_lr_and_says_so(demo_shards, two_step_run, tmp_path, capsys):
    import shutil
    from train.config import TrainConfig
    from train.optim import lr_factor
    out = tmp_path / "out"
    shutil.copytree(two_step_run, out)
    capsys.readouterr()
    _run(demo_shards, out, "train.max_steps=4", "train.lr=5e-4")
    said = capsys.readouterr().out
    assert "train.lr 0.001 -> 0.0005" in said
    cfg = TrainConfig(max_steps=4, lr=5e-4, warmup_ratio=0.25)   # tiny_test's schedule, the new base lr
    lrs = {r["step"]: r["lr"] for r in read_metrics(out)}
    # the lr logged at step s is the one the next step uses: factor(s) of the 0-based schedule
    assert lrs[3] == pytest.approx(5e-4 * lr_factor(3, cfg), rel=1e-9)
    assert lrs[4] == pytest.approx(5e-4 * lr_factor(4, cfg), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("change,key", [("train.micro_batch_size=2", "train.micro_batch_size"),
                                        ("data.shuffle_buffer=7", "data.shuffle_buffer"),
                                        ("train.lr_multipliers={vision.: 0.5}", "train.lr_multipliers")])
def test_resume_refuses_changes_it_cannot_apply(demo_shards, two_step_run, tmp_path, change, key):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(two_step_run, out)
    r = _cli(demo_shards, out, "train.max_steps=3", change)
    assert r.returncode == 2, r.stderr[-2000:]
    assert key in _one_error_line(r.stderr)
    assert _logged_steps(out) == [1, 2]


# ------------------------------------------------------------------------------------------ junk data
def test_bad_fraction_abort_is_one_line_exit_2_with_workers(demo_shards, tmp_path):
    import io
    import tarfile
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):   # 2 shards x 40 samples whose images are junk bytes: every sample is bad
        with tarfile.open(shards / f"{k}.tar", "w") as tar:
            for i in range(40):
                for ext, data in (("jpg", b"not a jpeg " * 8), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{k:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    r = _cli(demo_shards, tmp_path / "out", "train.max_steps=2", "data.num_workers=2", "data.bad_check_min_samples=20",
             f'data.train=[{{shards: "{shards}/{{0..1}}.tar"}}]')
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    assert "data.max_bad_fraction" in line and "bad_image" in line


# ------------------------------------------------------------------------------------------ signals and locks
def _sig_caught(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_sigterm_to_the_process_group_saves_with_loader_workers(demo_shards, tmp_path):
    out = tmp_path / "out"
    p = _start(demo_shards, out, "train.max_steps=500", "train.log_every=1", "data.num_workers=2")
    try:
        _wait_for(lambda: len(_logged_steps(out)) >= 1, 240, "a logged step", p)
        os.killpg(p.pid, signal.SIGTERM)   # what scancel does to a job step: every process of it
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 75, stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text()
    assert f"stopped by SIGTERM at step {latest[5:]} after saving checkpoint {latest}" in stdout


def test_sigusr1_during_startup_does_not_claim_a_save(demo_shards, tmp_path):
    out = tmp_path / "out"
    p = _start(demo_shards, out, "train.max_steps=500")
    try:
        _wait_for(lambda: _sig_caught(p.pid, signal.SIGUSR1), 120, "the stop handler", p)
        os.kill(p.pid, signal.SIGUSR1)
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 75, stderr[-3000:]
    assert "stopped by SIGUSR1 at step 0 before the first step; nothing to save" in stdout
    assert "after saving" not in stdout
    assert not (out / "checkpoints" / "latest").exists()


def test_a_second_run_on_a_locked_directory_is_refused(demo_shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # an independent holder, as another run would be
        os.write(fd, json.dumps({"pid": 424242, "host": "node-17", "since": "2026-11-30 10:00:00"}).encode())
        r = _cli(demo_shards, out, "train.max_steps=2")
    finally:
        os.close(fd)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "424242" in line and "node-17" in line
    assert not (out / "metrics.jsonl").exists()
    r = _cli(demo_shards, out, "train.max_steps=1")   # the holder is gone: the lock goes with it
    assert r.returncode == 0, r.stderr[-2000:]


def test_trainer_stops_and_saves_when_its_deepspeed_launcher_dies(demo_shards, tmp_path):
    out = tmp_path / "out"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1",
                "--master_port", str(_free_port()), str(REPO_ROOT / "train" / "pretrain.py")]
    p = _start(demo_shards, out, "train.max_steps=100000", "train.log_every=1", launcher=launcher)
    try:
        _wait_for(lambda: len(_logged_steps(out)) >= 1, 300, "a logged step", p)
        trainer = json.loads((out / ".lock").read_text())["pid"]
        assert trainer != p.pid
        os.kill(p.pid, signal.SIGTERM)   # the runner only: it does not pass SIGTERM on
        p.wait(timeout=60)
        _wait_for(lambda: not Path(f"/proc/{trainer}").exists() or
                  Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                  240, "the trainer to exit")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    latest = (out / "checkpoints" / "latest").read_text()
    assert 1 <= int(latest[5:]) < 100000   # stopped and saved, not finished
    assert (out / ".lock").read_text() == ""   # released on the way out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
