"""train/plot_metrics.py on run directories written here: panels, plotted values, junk lines, nothing to plot."""
import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import REPO_ROOT
from train import plot_metrics as pm

A_TRAIN = [{"step": 10, "loss": 9.0, "loss_itc": 3.0, "loss_mgsc": 6.0, "lr": 1e-4, "step_time": 1.5},
           {"step": 20, "loss": 7.0, "loss_itc": 2.5, "loss_mgsc": 4.5, "lr": 9e-5, "step_time": 1.4},
           {"step": 30, "loss": 5.5, "loss_itc": 2.0, "loss_mgsc": 3.5, "lr": 8e-5, "step_time": 1.4},
           {"step": 40, "loss": 4.0, "loss_itc": 1.5, "loss_mgsc": 2.5, "lr": 7e-5, "step_time": 1.3}]
A_EVAL = [{"step": 20, "i2t_r1": 0.05, "t2i_r1": 0.06, "i2t_r5": 0.2, "t2i_r5": 0.25, "chance": 0.004,
           "num_samples": 256, "align_global_box": 0.31},
          {"step": 40, "i2t_r1": 0.10, "t2i_r1": 0.12, "i2t_r5": 0.4, "t2i_r5": 0.45, "chance": 0.004,
           "num_samples": 256, "align_global_box": 0.42}]
B_TRAIN = [{"step": 5, "loss": 3.0, "loss_itc": 1.2, "loss_itm": 0.7},
           {"step": 10, "loss": 2.0, "loss_itc": 1.0, "loss_itm": 0.69},
           {"step": 15, "loss": 1.5, "loss_itc": 0.8, "loss_itm": 0.68}]
EXPECTED_PANELS = [("train", "loss"), ("train", "loss_itc"), ("train", "loss_itm"), ("train", "loss_mgsc"),
                   ("eval", "i2t_r1"), ("eval", "t2i_r1"), ("eval", "i2t_r5"), ("eval", "t2i_r5"),
                   ("eval", "align_global_box")]


def write_jsonl(path, records, tail=""):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    a.mkdir()
    b.mkdir()
    # run_a: a junk line in the middle, a non-numeric value, and a torn last line (a killed writer)
    lines = [json.dumps(r) for r in A_TRAIN[:2]] + ["not json at all"] + [json.dumps(r) for r in A_TRAIN[2:]]
    bad = {"step": 50, "loss": "nan-ish", "loss_itc": None, "loss_mgsc": 2.0}   # only loss_mgsc is a number
    inf = {"step": 55, "loss": float("nan"), "loss_itc": float("inf")}       # written as NaN / Infinity: skipped
    (a / "metrics.jsonl").write_text("\n".join(lines) + "\n" + json.dumps(bad) + "\n" + json.dumps(inf) + "\n"
                                     + '{"step": 60, "loss": 3.')
    write_jsonl(a / "eval.jsonl", A_EVAL)
    (a / "eval.json").write_text(json.dumps(A_EVAL[-1], indent=2))
    write_jsonl(b / "metrics.jsonl", B_TRAIN)    # run_b: no eval at all
    return str(a), str(b)


def lines_by_label(ax):
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_two_runs_png_with_expected_panels(two_runs, tmp_path, capsys):
    out = tmp_path / "plots" / "m.png"
    assert pm.main([*two_runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    printed = capsys.readouterr()
    assert "9 panels" in printed.out
    assert "no eval results" in printed.err and "unreadable line" in printed.err

    notes = []
    runs = [pm.load_run(p, os.path.basename(p), notes) for p in two_runs]
    fig, panels = pm.make_figure(runs)
    assert [(p.kind, p.key) for p in panels] == EXPECTED_PANELS
    assert len(fig.axes) == len(panels)
    assert [ax.get_title() for ax in fig.axes] == [p.title for p in panels]
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["run_a", "run_b"]


def test_plotted_values_are_the_files_values(two_runs):
    runs = [pm.load_run(p, os.path.basename(p), []) for p in two_runs]
    fig, panels = pm.make_figure(runs)
    axes = {(p.kind, p.key): ax for p, ax in zip(panels, fig.axes)}
    # the junk line and the torn line are gone; step 50 holds only loss_mgsc (its loss was a string); step 55
    # (NaN, Infinity) holds nothing
    got = lines_by_label(axes["train", "loss"])
    assert got["run_a"] == ([r["step"] for r in A_TRAIN], [r["loss"] for r in A_TRAIN])
    assert got["run_b"] == ([r["step"] for r in B_TRAIN], [r["loss"] for r in B_TRAIN])
    got = lines_by_label(axes["train", "loss_mgsc"])
    assert got == {"run_a": ([10, 20, 30, 40, 50], [r["loss_mgsc"] for r in A_TRAIN] + [2.0])}
    got = lines_by_label(axes["train", "loss_itm"])
    assert got == {"run_b": ([5, 10, 15], [0.7, 0.69, 0.68])}
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "align_global_box"):
        assert lines_by_label(axes["eval", key]) == {"run_a": ([20, 40], [e[key] for e in A_EVAL])}


def test_smoothing_is_a_trailing_moving_average(two_runs):
    runs = [pm.load_run(p, os.path.basename(p), []) for p in two_runs]
    fig, panels = pm.make_figure(runs, smooth=3)
    axes = {(p.kind, p.key): ax for p, ax in zip(panels, fig.axes)}
    raw = [r["loss_itc"] for r in A_TRAIN]
    want = [raw[0], (raw[0] + raw[1]) / 2, sum(raw[0:3]) / 3, sum(raw[1:4]) / 3]
    xs, ys = lines_by_label(axes["train", "loss_itc"])["run_a"]
    assert xs == [10, 20, 30, 40] and ys == pytest.approx(want, rel=1e-12)
    # eval curves are drawn as measured
    assert lines_by_label(axes["eval", "i2t_r1"])["run_a"][1] == [0.05, 0.10]


def test_eval_json_alone_and_missing_metrics(tmp_path):
    run = tmp_path / "only_eval"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(A_EVAL[-1], indent=2))
    notes = []
    r = pm.load_run(str(run), "only_eval", notes)
    assert r.train == [] and any("no metrics.jsonl" in n for n in notes)
    fig, panels = pm.make_figure([r])
    assert [p.key for p in panels] == ["i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "align_global_box"]
    assert lines_by_label(fig.axes[0]) == {"only_eval": ([40], [0.10])}


def test_nothing_plottable_is_one_error_line_and_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "metrics.jsonl").write_text('garbage\n{"no_step": 1}\n{"step": 3, "lr": 0.1}\n{"step": 4, "loss": "x"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pm.main([str(junk), str(empty), str(tmp_path / "absent"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("error:") for line in err) == 1 and err[-1].startswith("error: nothing to plot")
    assert not (tmp_path / "x.png").exists()


def test_cli_default_output_path(two_runs):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "train/plot_metrics.py", two_runs[0]], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.path.exists(os.path.join(two_runs[0], "metrics.png"))
    assert "8 panels" in p.stdout   # run_a alone has no loss_itm
