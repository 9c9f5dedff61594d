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


SIMLA_4M = str(ROOT / "train" / "configs" / "simla_4m.yaml")
# simla_4m.yaml at toy size: 64 px images (a 4 x 4 grid, the tokenizer view 32 px), a 1-layer 64-wide BERT on the
# MiniLM tokenizer; its DeiT and dVAE files are missing, so the ViT is random init and the dVAE a random one of the
# DALL-E encoder's real size (hidden 256, 8192 codes)
SIMLA_TOY = ["data.image_size=64", "model.vision.img_size=64", "model.vision.embed_dim=64", "model.vision.depth=1",
             "model.vision.num_heads=2",
             "model.text={tokenizer: minilm, hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}",
             "model.itc.embed_dim=16", "objectives.ita.queue_size=64", "objectives.xmm_image.num_masked=5",
             "objectives.xmm_image.min_block=2", "data.tokenizer_view.size=32"]


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_smoke_single_stream_benchmark_at_toy_size(engine, capsys):
    """A smoke test: simla_4m.yaml (all five SIMLA objectives) with a toy override runs real steps on CPU with
    synthetic batches that carry the tokenizer view, and reports samples/s, FLOPs per sample and peak memory. The
    FLOPs include the DALL-E-size dVAE's forward on the 32 px view (about 68 / 16 GFLOPs per image, train/flops.py)."""
    args = ["--config", SIMLA_4M, "--steps", "1", "--warmup", "1", "--batch", "2", "--engine", engine,
            "--deepspeed_config", str(ROOT / "ds_configs" / "cpu_demo.json"), *SIMLA_TOY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "objectives ita,itm,xmm_text,xmm_image,psl" in out and "tokenizer view 32px" in out
    assert "random-init dVAE of the DALL-E encoder's size" in out
    flops = float(re.search(r"GFLOPs/sample fwd\+bwd\s+([0-9.]+)", out).group(1))
    assert flops > 68.07 / 16   # the tokenizer's forward alone is 4.25
    assert float(re.search(r"peak memory \(process RSS\)\s+([0-9.]+) GiB", out).group(1)) > 0
    m = re.fullmatch(r"samples_per_sec: ([0-9.]+) mfu: n/a", out.strip().splitlines()[-1])
    assert m and float(m.group(1)) > 0


def test_largest_fitting_finds_the_threshold_within_the_granularity():
    """The micro-batch search against a brute-force answer: for every threshold T (sizes <= T fit), start, limit and
    granularity g, the result fits, is within g of the largest fitting size min(T, limit), and costs O(log) trials."""
    import math

    from train.benchmark import largest_fitting

    for start in (2, 3, 8):
        for limit in (start, 17, 64, 300):
            if limit < start:
                continue
            for g in (1, 4, 8):
                for threshold in range(0, 400, 7):
                    calls = []

                    def fits(b):
                        calls.append(b)
                        return b <= threshold

                    got = largest_fitting(fits, start, limit, g)
                    best = max((b for b in range(start, limit + 1) if b <= threshold), default=0)
                    if best == 0:
                        assert got == 0
                        continue
                    assert got <= best and got > best - g, (start, limit, g, threshold, got, best)
                    assert all(start <= b <= limit for b in calls)
                    assert len(calls) <= 2 * math.ceil(math.log2(limit / start + 1)) + 2


def test_find_max_batch_is_refused_on_cpu_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", TINY, "--batch", "2", "--device", "cpu", "--find-max-batch", "64"])
    assert e.value.code == 2
    assert "--find-max-batch needs a CUDA device" in capsys.readouterr().err
