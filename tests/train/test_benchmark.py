"""train/benchmark.py is what a GPU session runs at paper size: keep it runnable (tiny config, CPU, both engines)."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.benchmark import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "train" / "configs" / "tiny_test.yaml")


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_benchmark_runs_a_real_step_and_reports_throughput(engine, capsys):
    args = ["--config", TINY, "--steps", "2", "--warmup", "1", "--batch", "4", "--engine", engine,
            "--deepspeed_config", str(ROOT / "ds_configs" / "cpu_demo.json"), "--peak-tflops", "1.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    flops = float(re.search(r"GFLOPs/sample fwd\+bwd\s+([0-9.]+)", out).group(1))
    assert flops > 0
    m = re.fullmatch(r"samples_per_sec: ([0-9.]+) mfu: ([0-9.e-]+)", out.strip().splitlines()[-1])
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0
