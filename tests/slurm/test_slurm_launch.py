"""slurm/pretrain.sh against a real SLURM: `sbatch` with 2 tasks trains the tiny model on demo shards and
checkpoints; SIGUSR1 to the batch shell makes every rank save, the job requeues itself, and the requeued job
resumes at the saved step and data position (its losses equal an uninterrupted run's).

The cluster: Debian's slurmctld + two slurmd "nodes" on 127.0.0.1 (auth none, no munge), started once per module
in a tmp dir by start_cluster.sh and stopped by stop_cluster.sh (pid files, then any process still carrying this
cluster's SLURM_CONF) even when a test fails. The packages are apt-installed when missing and we are root;
otherwise, or when the daemons do not come up, the tests skip and say why."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACKAGES = ("slurmctld", "slurmd", "slurm-client")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ensure_slurm() -> str | None:
    """None when slurmctld/slurmd/sbatch are usable, else the reason they are not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return None
    if not sys.platform.startswith("linux") or not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install " + " ".join(PACKAGES)
    if os.geteuid() != 0:
        return "SLURM is not installed and installing " + " ".join(PACKAGES) + " needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode:   # stale or empty package lists: refresh once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode:
        return f"apt-get install {' '.join(PACKAGES)} failed: {(r.stderr or r.stdout)[-500:]}"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               and not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHON"] = sys.executable
        self.env = env

    def cmd(self, *args, timeout=30, check=True) -> str:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def sbatch(self, *args, env=None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=30, cwd=REPO_ROOT)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job -o` as a dict (kept by slurmctld for MinJobAge=300 s after the end)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id))
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def release_requeued(self, job_id: int, timeout: float = 30) -> None:
        """Start a requeued job now instead of after SLURM's ~2 min hold. Waits for the nodes to finish cleaning up
        the previous run first: slurmd refuses a credential issued in the same second it revoked the old one."""
        deadline = time.monotonic() + timeout
        while set(self.cmd("sinfo", "-h", "-N", "-o", "%T").split()) != {"idle"}:
            assert time.monotonic() < deadline, self.cmd("sinfo", "-N", check=False)
            time.sleep(0.3)
        time.sleep(1.5)
        self.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait_gone(self, job_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while self.cmd("squeue", "-h", "-j", str(job_id), check=False).strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still queued/running after {timeout} s: {self.job(job_id)}")
            time.sleep(0.3)
        return self.job(job_id)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _ensure_slurm()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm") / "cluster"
    ctld, n1, n2 = _free_ports(3)
    env = {**os.environ, "CTLD_PORT": str(ctld), "NODE1_PORT": str(n1), "NODE2_PORT": str(n2)}
    try:
        r = subprocess.run(["bash", str(HERE / "start_cluster.sh"), str(root)], env=env, capture_output=True,
                           text=True, timeout=90)
        if r.returncode:
            logs = "".join(p.read_text()[-400:] for p in sorted((root / "log").glob("*.log")))
            pytest.skip(f"SLURM daemons did not start: {r.stderr.strip()[-400:]} {logs}")
        yield Cluster(root)
    finally:
        subprocess.run(["bash", str(HERE / "stop_cluster.sh"), str(root)], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------------------------ the tests
MAX_STEPS = 12
TRAIN_ENV = {"CONFIG": "train/configs/tiny_test.yaml", "DS_CONFIG": "ds_configs/cpu_demo.json",
             "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "DS_SKIP_SHM_OP": "1", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Command-line flags override the script's production #SBATCH lines (8 GPUs per node, 2 nodes, 24 h).
CPU_FLAGS = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=00:10:00"]
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_mlm", "lr")


def _overrides(demo) -> list[str]:
    return [f'data.train=[{{shards: "{demo["paths"]["train_images"]}", modality: image}}]', "data.eval=[]",
            "data.num_workers=1", f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.save_every=0",
            "train.check_ranks_in_sync=true"]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(out: Path, job_id: int) -> str:
    path = out / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _train_state_files(ckpt: Path) -> list[str]:
    return sorted(n for n in os.listdir(ckpt) if n.startswith("train_state_rank"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, demo_shards, tmp_path_factory):
    """The reference: 1 node x 2 tasks, never signalled."""
    out = tmp_path_factory.mktemp("slurm_full") / "run"
    job = slurm_cluster.sbatch("--nodes=1", "--ntasks-per-node=2", *CPU_FLAGS, f"--output={out.parent}/sbatch-%j.out",
                               "slurm/pretrain.sh", *_overrides(demo_shards), env={**TRAIN_ENV, "OUTPUT_DIR": str(out)})
    info = slurm_cluster.wait_gone(job, timeout=150)
    return job, info, out


def test_sbatch_two_tasks_trains_and_checkpoints(uninterrupted):
    from train.distributed import slurm_master_port

    job, info, out = uninterrupted
    log = _log(out, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert info["Restarts"] == "0"
    assert "task rank 0/2 local 0 on node1" in log and "task rank 1/2 local 1 on node1" in log, log[-3000:]
    assert f"rendezvous 127.0.0.1:{slurm_master_port(job)}" in log
    assert "ranks in sync: True" in log
    assert [r["step"] for r in _metrics(out)] == list(range(1, MAX_STEPS + 1))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{MAX_STEPS}"
    assert _train_state_files(ckpt / f"step_{MAX_STEPS}") == ["train_state_rank0.pt", "train_state_rank1.pt"]
    assert "training finished" in log and "requeue" not in log


def test_usr1_saves_requeues_and_resumes_at_the_same_step(slurm_cluster, uninterrupted, demo_shards, tmp_path):
    out = tmp_path / "run"
    cl = slurm_cluster
    # 2 nodes x 1 task: the rendezvous and the forwarded signal have to cross nodes
    job = cl.sbatch("--nodes=2", "--ntasks-per-node=1", *CPU_FLAGS, f"--output={tmp_path}/sbatch-%j.out",
                    "slurm/pretrain.sh", *_overrides(demo_shards), env={**TRAIN_ENV, "OUTPUT_DIR": str(out)})
    deadline = time.monotonic() + 120
    while len(_metrics(out)) < 2:   # training is under way on both ranks
        assert time.monotonic() < deadline and cl.cmd("squeue", "-h", "-j", str(job)).strip(), _log(out, job)[-3000:]
        time.sleep(0.2)
    cl.cmd("scancel", "--batch", "--signal=USR1", str(job))     # what --signal=B:USR1@T does before the limit

    deadline = time.monotonic() + 90   # the job requeues itself: back to PENDING with one restart
    while not (cl.job(job).get("Restarts") == "1" and cl.job(job)["JobState"] == "PENDING"):
        assert time.monotonic() < deadline, (cl.job(job), _log(out, job)[-3000:])
        time.sleep(0.3)
    log = _log(out, job)
    assert "task rank 0/2 local 0 on node1" in log and "task rank 1/2 local 0 on node2" in log, log[-3000:]
    saved = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= saved < MAX_STEPS, log[-3000:]
    assert [r["step"] for r in _metrics(out)] == list(range(1, saved + 1))   # stopped at a step boundary
    assert _train_state_files(out / "checkpoints" / f"step_{saved}") == ["train_state_rank0.pt", "train_state_rank1.pt"]
    assert f"stopped by SIGUSR1 at step {saved}" in log and "Exited with exit code 75" in log, log[-3000:]
    assert f"requeueing job {job} (restart 1)" in log

    cl.release_requeued(job)
    info = cl.wait_gone(job, timeout=150)
    log = _log(out, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, log[-3000:])
    assert f"job {job} restart 1:" in log and f"latest checkpoint: step_{saved}" in log
    assert f"resumed from {out / 'checkpoints' / f'step_{saved}'} at step {saved}" in log, log[-3000:]
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))     # no gap, no repeat
    assert (out / "checkpoints" / "latest").read_text() == f"step_{MAX_STEPS}"
    # Same data position, RNG and optimizer state: every step matches the uninterrupted run (same world size,
    # other node layout).
    reference = _metrics(uninterrupted[2])
    for a, b in zip(reference, records):
        assert [b[k] for k in LOSSES] == [a[k] for k in LOSSES], (a["step"], saved)


@pytest.mark.parametrize("status, says", [(1, "exited with status 1: crash, not requeueing"),
                                          (75, "no new checkpoint during this job: not requeueing")])
def test_crash_or_stop_without_progress_is_not_requeued(slurm_cluster, tmp_path, status, says):
    """The tasks' exit status decides; a stand-in trainer that only exits keeps this to a couple of seconds."""
    fake = tmp_path / "trainer"
    fake.write_text(f"#!/bin/sh\nexit {status}\n")
    fake.chmod(0o755)
    out = tmp_path / "run"
    job = slurm_cluster.sbatch("--nodes=1", "--ntasks-per-node=2", *CPU_FLAGS, f"--output={tmp_path}/sbatch-%j.out",
                               "slurm/pretrain.sh", env={**TRAIN_ENV, "OUTPUT_DIR": str(out), "PYTHON": str(fake)})
    info = slurm_cluster.wait_gone(job, timeout=60)
    log = _log(out, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{status}:0", (info, log)
    assert info["Restarts"] == "0" and says in log and "requeueing job" not in log, log


def test_sbatch_finetune_vqa_two_tasks(slurm_cluster, tmp_path):
    """slurm/finetune_vqa.sh (INIT from the environment) fine-tunes the tiny model on 2 tasks through the same
    launch logic as pretraining and writes the evaluation and the EvalAI file."""
    from datasets.task_demo import generate
    from tests.train.conftest import write_tiny_init

    root = tmp_path / "tasks"
    generate(str(root), coco_train=16, coco_restval=2, coco_val=4, coco_test=4, msrvtt_train=2, msrvtt_test=2,
             vqa_train=24, vqa_val=8, vqa_testdev=4, testdev_images=2)
    init = write_tiny_init(tmp_path / "init.safetensors")
    v, img = f"{root}/vqa", f"{root}/coco/images"
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=2", *CPU_FLAGS, f"--output={tmp_path}/sbatch-%j.out", "slurm/finetune_vqa.sh",
        f"task.train=[{{questions: {v}/v2_OpenEnded_mscoco_train2014_questions.json, annotations: "
        f"{v}/v2_mscoco_train2014_annotations.json, image_root: {img}/train2014}}]",
        f"task.eval={{questions: {v}/v2_OpenEnded_mscoco_val2014_questions.json, annotations: "
        f"{v}/v2_mscoco_val2014_annotations.json, image_root: {img}/val2014}}",
        f"task.test={{questions: {v}/v2_OpenEnded_mscoco_test-dev2015_questions.json, image_root: {img}/test2015, "
        "image_pattern: 'COCO_test2015_{image_id:012d}.jpg'}", "task.vocab_min_count=1", "data.image_size=32",
        "model.vision.img_size=32", "data.num_workers=0", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.epochs=1", "train.check_ranks_in_sync=true",
        env={**TRAIN_ENV, "CONFIG": "train/configs/finetune/demo_vqa.yaml", "OUTPUT_DIR": str(out), "INIT": init})
    info = slurm_cluster.wait_gone(job, timeout=150)
    log = _log(out, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-3000:])
    assert "task.init" in log and "ranks in sync: True" in log, log[-3000:]
    assert json.loads((out / "eval.json").read_text())["vqa_num_scored"] == 8
    assert len(json.loads((out / "vqa_test_predictions.json").read_text())) == 4
