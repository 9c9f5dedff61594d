"""train/ablation.py: a real tiny ablation (3 variants x 1 seed x 2 steps, real pretrain.py subprocesses) and the
aggregation on run directories written here, checked against statistics.mean / statistics.stdev."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.train.conftest import REPO_ROOT, TINY, data_overrides
from train import ablation

VARIANTS = [v for v, _, _ in ablation.VARIANTS]
KEYS = ["i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"]


def test_smoke_ablation_tiny(demo_shards, tmp_path):
    out = tmp_path / "abl"
    sets = [x for o in data_overrides(demo_shards) + ["train.log_every=1"] for x in ("--set", o)]
    cmd = [sys.executable, "train/ablation.py", "--config", TINY, "--seeds", "7", "--steps", "2", "--out", str(out),
           "--align-bench", "none", *sets]
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"[1/{len(VARIANTS)}] starting itc_itm_mlm_seed7 ({len(VARIANTS) - 1} remain after it)" in p.stdout
    res = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res) >= {"date", "machine", "settings", "variants", "runs", "aggregate", "missing", "markdown"}
    assert res["machine"]["torch"] and res["machine"]["cpu_count"] >= 1 and "cpu_model" in res["machine"]
    assert res["missing"] == [] and res["settings"]["steps"] == 2 and res["settings"]["seeds"] == [7]
    assert [(r["variant"], r["seed"], r["status"]) for r in res["runs"]] == [(v, 7, "ok") for v in VARIANTS]
    for r, (v, _, objectives) in zip(res["runs"], ablation.VARIANTS):
        assert f"objectives={objectives}" in r["command"] and "train.seed=7" in r["command"]
        assert ("model.vision.mask_token=true" in r["command"]) == ("semmim" in v)
        assert "train.max_steps=2" in r["command"] and demo_shards["paths"]["train_images"] in r["command"]
        assert r["exit_code"] == 0 and r["wall_s"] > 0
        run_dir = out / f"{v}_seed7"
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["step"] == 2 and {k: r["values"][k] for k in KEYS} == {k: ev[k] for k in KEYS}
        assert r["values"]["s_per_step"] > 0
    # which objectives each variant actually trained: the loss keys the runs logged
    logged = {v: set(json.loads((out / f"{v}_seed7" / "metrics.jsonl").read_text().splitlines()[-1]))
              for v in VARIANTS}
    assert "loss_mgsc" not in logged["itc_itm_mlm"] and "loss_mgsc" in logged["plus_mgsc"]
    assert "loss_mltc_image" not in logged["plus_mgsc"] and "loss_mltc_image" in logged["plus_mgsc_mltc"]
    assert "loss_semmim_mim" not in logged["plus_mgsc_mltc"] and "loss_semmim_mim" in logged["plus_semmim"]
    assert "loss_mgsc" not in logged["plus_semmim"]
    assert {"loss_semmim_mim", "loss_mgsc", "loss_mltc_image"} <= logged["glscl_semmim"]
    for v in VARIANTS:
        stats = res["aggregate"][v]["metrics"]
        assert set(stats) == set(KEYS) | {"s_per_step"}
        assert stats["i2t_r1"]["n"] == 1 and stats["i2t_r1"]["std"] is None
    assert "| ITC+ITM+MLM | 1/1 |" in p.stdout and "| objectives | runs | i2t R@1" in p.stdout

    # a second call reuses every finished run (no training)
    p2 = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0 and p2.stdout.count("reused (finished)") == len(VARIANTS), p2.stdout + p2.stderr


def test_semmim_rows_use_the_semmim_demo_settings():
    """The SemMIM rows claim to train semmim_demo.yaml's SemMIM (README): the ablation's SemMIM mapping, parsed, must
    equal that config's objectives.semmim apart from the weight (the dataclass default, 1.0, as there)."""
    import yaml
    demo = yaml.safe_load((REPO_ROOT / "train" / "configs" / "semmim_demo.yaml").read_text())["objectives"]["semmim"]
    ours = yaml.safe_load("{" + ablation.SEMMIM + "}")["semmim"]
    assert demo.pop("weight") == 1.0 and ours == demo
    for v in ("plus_semmim", "glscl_semmim"):
        objectives = yaml.safe_load(dict((n, o) for n, _, o in ablation.VARIANTS)[v])
        assert objectives["semmim"] == demo and ablation.VARIANT_SETS[v] == ["model.vision.mask_token=true"]


def write_run(root, variant, seed, steps, ev=None, step_times=None):
    d = root / f"{variant}_seed{seed}"
    d.mkdir(parents=True)
    if ev is not None:
        (d / "eval.json").write_text(json.dumps({"step": steps, **ev, "chance": 0.004, "num_samples": 256}))
    lines = [json.dumps({"step": s, "loss": 1.0, "step_time": t}) for s, t in (step_times or [])]
    (d / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if lines else "") + '{"step": 99, "step_ti')
    return d


def test_aggregation_on_synthetic_runs(tmp_path):
    """3 variants x seeds 1 2 3; itc_itm_mlm seed 3 has no dir; plus_mgsc seed 2 stopped before its final eval; the
    GLSCL runs have align scores. Aggregates recomputed here with statistics.mean / stdev."""
    out, steps, seeds = tmp_path / "abl", 30, [1, 2, 3]
    values, times = {}, {}
    for vi, v in enumerate(VARIANTS):
        for s in seeds:
            if (v, s) == ("itc_itm_mlm", 3):
                continue
            ev = {k: round(0.01 * (vi + 1) * s + 0.001 * ki, 6) for ki, k in enumerate(KEYS)}
            if v == "plus_mgsc_mltc":
                ev.update(align_global_box=0.3 + 0.01 * s, align_local_pixel=0.5 - 0.02 * s)
            st = [(10, 1.0 + s), (20, 2.0 + s), (30, 4.0)]   # 10 steps each: mean (1+s + 2+s + 4) / 3
            if (v, s) == ("plus_mgsc", 2):
                write_run(out, v, s, steps, None, st[:2])
                (out / f"{v}_seed{s}" / "eval.json").write_text(json.dumps({"step": 20, **ev}))
                continue
            write_run(out, v, s, steps, ev, st)
            values[v, s], times[v, s] = ev, (1.0 + s + 2.0 + s + 4.0) / 3
    # a different step split: records at 5 and 30 -> (5 * 2.0 + 25 * 3.0) / 30
    d = out / "plus_mgsc_seed3"
    (d / "metrics.jsonl").write_text(json.dumps({"step": 5, "step_time": 2.0}) + "\nnot json\n"
                                     + json.dumps({"step": 30, "step_time": 3.0}) + "\n")
    times["plus_mgsc", 3] = (5 * 2.0 + 25 * 3.0) / 30

    rc = ablation.main(["--aggregate-only", "--out", str(out), "--seeds", *map(str, seeds), "--steps", str(steps),
                        "--align-bench", "none"])
    assert rc == 1   # runs are missing
    res = json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.png").exists()
    assert sorted(res["missing"]) == ["itc_itm_mlm_seed3", "plus_mgsc_seed2"]
    agg = res["aggregate"]
    assert agg["itc_itm_mlm"]["missing_seeds"] == [3] and agg["itc_itm_mlm"]["n_ok"] == 2
    assert agg["plus_mgsc"]["missing_seeds"] == [2] and agg["plus_mgsc_mltc"]["missing_seeds"] == []
    for v in VARIANTS:
        ok = [s for s in seeds if (v, s) in values]
        for k in KEYS + ["align_global_box", "align_local_pixel"]:
            xs = [values[v, s][k] for s in ok if k in values[v, s]]
            got = agg[v]["metrics"][k]
            if not xs:   # only the GLSCL runs have align scores
                assert got == {"mean": None, "std": None, "n": 0, "values": []}
                continue
            assert got["n"] == len(xs) and got["values"] == pytest.approx(xs)
            assert got["mean"] == pytest.approx(statistics.mean(xs), rel=1e-12)
            assert got["std"] == pytest.approx(statistics.stdev(xs), rel=1e-12)
        ts = [times[v, s] for s in ok]
        assert agg[v]["metrics"]["s_per_step"]["mean"] == pytest.approx(statistics.mean(ts), rel=1e-12)
        assert agg[v]["metrics"]["s_per_step"]["std"] == pytest.approx(statistics.stdev(ts), rel=1e-12)
    assert "align_global_pixel" not in agg["plus_mgsc_mltc"]["metrics"]   # no run has it
    table = res["markdown"].splitlines()
    assert table[0] == ("| objectives | runs | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 | align_global_box | "
                        "align_local_pixel | s/step |")
    assert table[2].startswith("| ITC+ITM+MLM | 2/3 (missing seed 3) | ")
    m = statistics.mean([values["itc_itm_mlm", s]["i2t_r1"] for s in (1, 2)])
    sd = statistics.stdev([values["itc_itm_mlm", s]["i2t_r1"] for s in (1, 2)])
    assert f"| {m:.3f} ± {sd:.3f} |" in table[2] and table[2].count("missing") == 3   # 2 align cells + the runs cell


def test_run_states_and_bad_arguments(tmp_path, capsys):
    cmd = ablation.build_command("{itc: {}}", 1, 4, str(tmp_path / "r"), "c.yaml", "ds.json", None, ["a.b=1"])
    assert cmd[-4:] == ["a.b=1", "objectives={itc: {}}", "train.seed=1", "train.max_steps=4"]
    rd = str(tmp_path / "r")
    assert ablation.run_state(rd, 4, cmd) == "new"
    os.makedirs(rd)
    (tmp_path / "r" / "stray").write_text("x")
    assert ablation.run_state(rd, 4, cmd) == "foreign"
    (tmp_path / "r" / ablation.RUN_META).write_text(json.dumps({"command": ["other-python", *cmd[1:]],
                                                                "exit_code": None}))
    assert ablation.run_state(rd, 4, cmd) == "resume"      # started by this command, not finished
    (tmp_path / "r" / ablation.RUN_META).write_text(json.dumps({"command": cmd, "exit_code": 0}))
    (tmp_path / "r" / "eval.json").write_text(json.dumps({"step": 4, "i2t_r1": 0.1}))
    assert ablation.run_state(rd, 4, cmd) == "finished"
    assert ablation.run_state(rd, 4, cmd[:-1] + ["train.max_steps=5"]) == "foreign"
    assert ablation.main(["--out", str(tmp_path / "o"), "--set", "train.seed=3"]) == 2
    assert ablation.main(["--out", str(tmp_path / "o"), "--set", "objectives.mgsc.weight=2"]) == 2
    assert ablation.main(["--out", str(tmp_path / "o"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert ablation.main(["--out", str(tmp_path / "o"), "--variants", "plus_semmim", "plus_mim"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "--variants: unknown ['plus_mim']" in err[3]
    # --variants: only those rows are planned and aggregated
    assert ablation.main(["--aggregate-only", "--out", str(tmp_path / "agg"), "--seeds", "1", "--steps", "4",
                          "--align-bench", "none", "--variants", "plus_semmim", "itc_itm_mlm"]) == 1   # all missing
    res = json.loads((tmp_path / "agg" / "ablation.json").read_text())
    assert list(res["aggregate"]) == ["itc_itm_mlm", "plus_semmim"]   # the table's order, not the argument's
    assert sorted(res["missing"]) == ["itc_itm_mlm_seed1", "plus_semmim_seed1"]


def test_failed_and_foreign_runs_are_missing(tmp_path, capsys):
    """A run dir this script did not write (finished eval.json, no record of its command) is refused, not counted;
    a run whose pretrain.py fails (bad override: exit 2) prints its log path, the others still run."""
    out = tmp_path / "abl"
    for v in VARIANTS:
        write_run(out, v, 1, 4, {k: 0.5 for k in KEYS}, [(4, 1.0)])
    rc = ablation.main(["--out", str(out), "--seeds", "1", "--steps", "4", "--align-bench", "none"])
    res = json.loads((out / "ablation.json").read_text())
    assert rc == 1 and res["missing"] == [f"{v}_seed1" for v in VARIANTS]
    assert all(r["status"] == "failed" and r["values"] == {} for r in res["runs"])
    assert all(a["n_ok"] == 0 for a in res["aggregate"].values())
    assert capsys.readouterr().out.count("SKIPPED") == len(VARIANTS)

    out2 = tmp_path / "abl2"
    rc = ablation.main(["--out", str(out2), "--seeds", "1", "--steps", "4", "--align-bench", "none",
                        "--config", TINY, "--set", "train.lr=abc"])
    printed = capsys.readouterr().out
    res = json.loads((out2 / "ablation.json").read_text())
    n = len(VARIANTS)
    assert rc == 1 and [r["exit_code"] for r in res["runs"]] == [2] * n
    assert printed.count("FAILED (exit status 2)") == n and f"[{n}/{n}] starting {VARIANTS[-1]}_seed1" in printed
    log = out2 / "itc_itm_mlm_seed1" / ablation.RUN_LOG
    assert f"log: {log}" in printed and "train.lr" in log.read_text()
    assert "| ITC+ITM+MLM | 0/1 (missing seed 1) |" in printed
