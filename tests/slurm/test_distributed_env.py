"""Rank/rendezvous discovery (train/distributed.py) for the ways a trainer is started, and the stop-signal handler
of train/pretrain.py; no cluster needed."""
import os
import signal
from pathlib import Path

import pytest

from train.distributed import discover, first_host, setup_env, slurm_master_port
from train.launch import EXIT_STOPPED, StopOnSignal

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k in LAUNCH_VARS or k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    return monkeypatch


def srun_task(env, procid, localid, ntasks=4, nodes=2, nodelist="gpu[007-008]", job_id=123456):
    """The variables srun gives task `procid` (as seen on the test cluster), inside a job of `ntasks` tasks."""
    for k, v in dict(SLURM_JOB_ID=job_id, SLURM_STEP_ID=0, SLURM_PROCID=procid, SLURM_LOCALID=localid,
                     SLURM_NTASKS=ntasks, SLURM_STEP_NUM_TASKS=ntasks, SLURM_NNODES=nodes,
                     SLURM_STEP_NUM_NODES=nodes, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist).items():
        env.setenv(k, str(v))


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("node[1-2]", "node1"),
                                             ("gpu[007-010,12],cpu1", "gpu007"), ("a,b", "a"),
                                             ("rack[3-4]-n[09,11]", "rack3-n09"), ("x[5]", "x5")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_first_host_rejects_garbage():
    with pytest.raises(ValueError, match="gpu\\[1-2"):
        first_host("gpu[1-2")


def test_srun_task_multi_node(clean_env):
    srun_task(clean_env, procid=3, localid=1)
    assert discover() == (3, 4, 1, "slurm")
    setup_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu007"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000) == str(slurm_master_port(123456))


def test_srun_task_one_node_uses_loopback(clean_env):
    srun_task(clean_env, procid=1, localid=1, ntasks=2, nodes=1, nodelist="node1")
    setup_env()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["RANK"] == "1"


def test_launcher_variables_win_over_slurm(clean_env):
    """torchrun/deepspeed inside an allocation: SLURM_PROCID is the launcher's task, RANK is the process's."""
    srun_task(clean_env, procid=1, localid=0, ntasks=2)
    for k, v in dict(RANK=5, WORLD_SIZE=16, LOCAL_RANK=5, MASTER_ADDR="10.0.0.1", MASTER_PORT=29999).items():
        clean_env.setenv(k, str(v))
    assert discover() == (5, 16, 5, "launcher")
    setup_env()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "29999")


def test_plain_python_in_batch_script_is_single_process(clean_env):
    """The batch shell of a 16-task job has SLURM_PROCID=0 and SLURM_NTASKS=16 but no step: not a 16-rank world."""
    for k, v in dict(SLURM_JOB_ID=7, SLURM_PROCID=0, SLURM_NTASKS=16, SLURM_NNODES=2,
                     SLURM_JOB_NODELIST="node[1-2]").items():
        clean_env.setenv(k, str(v))
    assert discover() == (0, 1, 0, "single")
    setup_env()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize("env, match", [(dict(RANK="x", WORLD_SIZE="2"), "RANK='x'"),
                                        (dict(RANK="2", WORLD_SIZE="2"), "inconsistent.*RANK='2'")])
def test_bad_rank_environment_is_named(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        discover()


class _Engine:   # the one method StopOnSignal calls
    def __init__(self):
        self.stop_requests = 0

    def request_stop(self):
        self.stop_requests += 1


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_before_and_after_the_engine_exists(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    stop = StopOnSignal().install()
    try:
        os.kill(os.getpid(), sig)      # during startup: remembered, not fatal
        engine = _Engine()
        stop.attach(engine)
        assert engine.stop_requests == 1 and stop.name == sig.name
        os.kill(os.getpid(), signal.SIGUSR1)   # while training: forwarded at once
        assert engine.stop_requests == 2 and stop.name == sig.name   # the first signal names the stop
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before
    assert EXIT_STOPPED == 75 == int((Path(__file__).resolve().parents[2] / "slurm" / "common.sh").read_text().split("GLSCL_EXIT_STOPPED=")[1].split()[0])
