r"""Plot the training losses and eval metrics of one or more run directories into one PNG.

  python train/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out FILE.png] [--smooth K]

What a run directory written by train/pretrain.py holds (train/engine.py, train/loggers.py):
  metrics.jsonl   one record per logged step: step, loss, loss_<objective> (loss_itc, loss_mgsc, loss_mltc_image,
                  ...), lr, samples_per_sec, step_time, ...
  eval.jsonl      one record per evaluation: step, i2t_r1, t2i_r1, i2t_r5, t2i_r5, ... (and align_* scores when an
                  ALIGN-BENCH set is evaluated); several eval sources give prefixed keys (`coco_val/i2t_r1`)
  eval.json       the latest evaluation only (used when eval.jsonl is absent)
Eval records found in metrics.jsonl (none today) are plotted too.

Panels: the total `loss`, one per per-objective loss key (`loss_*`), then one per eval metric (retrieval R@K
`i2t_r*` / `t2i_r*`, and every `align_*` score), over all runs given; the runs are overlaid, one colour each, with a
legend of run directory names. `--smooth K` draws the trailing K-point moving average of the loss curves (eval
metrics are drawn as measured). Unreadable lines (a torn last line, junk), non-numeric or non-finite values, a run
without eval, a run without metrics.jsonl: skipped, with one `note:` line each. Nothing plottable at all: one
`error:` line and exit status 2. Output: --out, default RUN_DIR/metrics.png for one run, else ./metrics.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

RETRIEVAL = re.compile(r"^(i2t|t2i)_r(\d+)$")


@dataclass
class Run:
    name: str                      # legend label
    path: str
    train: list[dict] = field(default_factory=list)   # metrics.jsonl records (numeric values only)
    evals: list[dict] = field(default_factory=list)   # eval records, one per step, sorted by step


@dataclass(frozen=True)
class Panel:
    kind: str   # "train" (metrics.jsonl) or "eval"
    key: str

    @property
    def title(self) -> str:
        return self.key if self.kind == "train" else f"eval: {self.key}"


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def read_jsonl(path: str, notes: list[str]) -> list[dict]:
    """The file's records with an integer step and their finite numeric values; everything else skipped + noted."""
    records, bad_lines, bad_values = [], [], 0
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad_lines.append(n)
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                bad_lines.append(n)
                continue
            clean = {"step": step}
            for k, v in rec.items():
                if k == "step":
                    continue
                x = _number(v)
                if x is None:
                    bad_values += 1
                else:
                    clean[k] = x
            records.append(clean)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        notes.append(f"note: {path}: skipped {len(bad_lines)} unreadable line(s) (line {shown})")
    if bad_values:
        notes.append(f"note: {path}: skipped {bad_values} non-numeric or non-finite value(s)")
    return records


def is_eval_key(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return bool(RETRIEVAL.match(base)) or base.startswith("align_")


def is_loss_key(key: str) -> bool:
    return key == "loss" or key.startswith("loss_")


def load_run(path: str, name: str, notes: list[str]) -> Run:
    run = Run(name=name, path=path)
    if not os.path.isdir(path):
        notes.append(f"note: {path}: not a directory; skipped")
        return run
    metrics = os.path.join(path, "metrics.jsonl")
    evals: dict[int, dict] = {}
    if os.path.isfile(metrics):
        for rec in read_jsonl(metrics, notes):
            if any(is_eval_key(k) for k in rec):
                evals.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if is_eval_key(k)})
            if any(is_loss_key(k) for k in rec):
                run.train.append(rec)
    else:
        notes.append(f"note: {path}: no metrics.jsonl; no loss curves for this run")
    eval_jsonl, eval_json = os.path.join(path, "eval.jsonl"), os.path.join(path, "eval.json")
    found: list[dict] = []
    if os.path.isfile(eval_jsonl):
        found = read_jsonl(eval_jsonl, notes)
    elif os.path.isfile(eval_json):   # the latest eval only (one JSON object, maybe pretty-printed)
        try:
            with open(eval_json) as f:
                rec = json.load(f)
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                found = [{"step": step, **{k: x for k, v in rec.items() if (x := _number(v)) is not None}}]
            else:
                notes.append(f"note: {eval_json}: no integer step; skipped")
        except ValueError:
            notes.append(f"note: {eval_json}: not valid JSON; skipped")
    for rec in found:
        evals.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if is_eval_key(k)})
    run.evals = [{"step": s, **v} for s, v in sorted(evals.items()) if v]
    run.train.sort(key=lambda r: r["step"])
    if not run.evals and os.path.isdir(path):
        notes.append(f"note: {path}: no eval results; no eval curves for this run")
    return run


def _eval_order(key: str):
    prefix, _, base = key.rpartition("/")
    m = RETRIEVAL.match(base)
    if m:   # i2t_r1, t2i_r1, i2t_r5, t2i_r5, ...
        return (prefix, 0, int(m.group(2)), m.group(1) != "i2t", base)
    return (prefix, 1, 0, False, base)


def panels_for(runs: list[Run]) -> list[Panel]:
    """The panels the figure has, in order: loss, loss_* (sorted), then the eval metrics."""
    loss = {k for r in runs for rec in r.train for k in rec if is_loss_key(k)}
    ev = {k for r in runs for rec in r.evals for k in rec if k != "step"}
    ordered = sorted(loss, key=lambda k: (k != "loss", k))
    return [Panel("train", k) for k in ordered] + [Panel("eval", k) for k in sorted(ev, key=_eval_order)]


def moving_average(values: list[float], k: int) -> list[float]:
    """Trailing mean over the last k points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(i + 1, k))
    return out


def series(run: Run, panel: Panel, smooth: int = 1) -> tuple[list[int], list[float]]:
    recs = run.train if panel.kind == "train" else run.evals
    pts = [(r["step"], r[panel.key]) for r in recs if panel.key in r]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if panel.kind == "train" and smooth > 1:
        ys = moving_average(ys, smooth)
    return xs, ys


def run_labels(paths: list[str]) -> list[str]:
    """Run dir base names; the path as given when two runs share a base name."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else [os.path.normpath(p) for p in paths]


def make_figure(runs: list[Run], smooth: int = 1):
    """(matplotlib Figure, panel list); fig.axes[i] is panels[i], one Line2D per run that has the key, labelled
    with the run's name. None for the figure when there is no panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_for(runs)
    if not panels:
        return None, panels
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows + 0.6), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    colours = {r.name: f"C{i % 10}" for i, r in enumerate(runs)}
    for ax, panel in zip(flat, panels):
        for run in runs:
            xs, ys = series(run, panel, smooth)
            if xs:
                ax.plot(xs, ys, color=colours[run.name], label=run.name,
                        marker="o" if panel.kind == "eval" else None, markersize=4)
        ax.set_title(panel.title + (f" (moving avg {smooth})" if panel.kind == "train" and smooth > 1 else ""),
                     fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[r.name], label=r.name) for r in runs if r.train or r.evals]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig, panels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/plot_metrics.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG path (default RUN_DIR/metrics.png for one run, else ./metrics.png)")
    p.add_argument("--smooth", type=int, default=1, metavar="K", help="trailing moving average of K logged points "
                                                                       "for the loss curves (default 1: none)")
    a = p.parse_args(argv)
    if a.smooth < 1:
        print(f"error: --smooth: expected an integer >= 1, got {a.smooth}", file=sys.stderr)
        return 2
    notes: list[str] = []
    runs = [load_run(path, name, notes) for path, name in zip(a.run_dirs, run_labels(a.run_dirs))]
    for n in notes:
        print(n, file=sys.stderr)
    runs = [r for r in runs if r.train or r.evals]
    fig, panels = make_figure(runs, a.smooth)
    if fig is None:
        print(f"error: nothing to plot in {' '.join(a.run_dirs)} (no readable loss or eval records)", file=sys.stderr)
        return 2
    out = a.out or (os.path.join(a.run_dirs[0], "metrics.png") if len(a.run_dirs) == 1 else "metrics.png")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: {len(runs)} run(s), {len(panels)} panels: {', '.join(pn.title for pn in panels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
