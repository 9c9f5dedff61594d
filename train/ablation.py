r"""What MGSC, MLTC and SemMIM add over ITC + ITM + MLM, measured on the CPU demo (`make ablation`).

  python train/ablation.py [--seeds 42 43 44] [--steps 80] [--out runs/ablation] [--config train/configs/demo.yaml]
                           [--deepspeed_config ds_configs/cpu_demo.json] [--align-bench DIR|none]
                           [--set dotted.key=value ...] [--variants NAME ...] [--aggregate-only]

Trains the config five ways, everything else equal (data, steps, schedule, batch, model sizes):
  itc_itm_mlm      objectives={itc: {}, itm: {pairs: b}, mlm: {}}
  plus_mgsc        the same + mgsc: {}
  plus_mgsc_mltc   the same + mgsc: {} + mltc: {}   (the GLSCL set; for demo.yaml this is the demo's own objectives)
  plus_semmim      itc_itm_mlm + semmim (SEMMIM below; with model.vision.mask_token=true)
  glscl_semmim     plus_mgsc_mltc + semmim (likewise)
with every seed (train.seed=S), each run one subprocess (--variants: only those, e.g. the rows a change touches)

  python train/pretrain.py --deepspeed_config DS --config CONFIG --output_dir OUT/<variant>_seed<S> \
      [--set overrides ...] objectives=... train.seed=S train.max_steps=STEPS [data.align_bench=DIR]

(a dotted override replaces a whole mapping, so `objectives=` is the whole objective set; weights and options are
the dataclass defaults, which equal demo.yaml's). `data.align_bench=DIR` is added when an ALIGN-BENCH set is found:
--align-bench DIR, default data/demo/align_bench when it exists; `--align-bench none` leaves it out. Its eval adds
align_global_box, align_global_pixel, align_local_box, align_local_pixel to eval.json.

Each run's output goes to OUT/<run>/ablation.log (and OUT/<run>/ablation_run.json: command, exit status, wall
time; written before the start too). A run dir whose recorded command is this one is reused when that command exited
0 with eval.json at the last step, else handed to pretrain.py again, which resumes a crashed run from its checkpoint.
A run dir holding anything else (another command's run, files this script did not write) is refused, not reused. A
run that fails is reported with its log path and the rest continue; it shows as missing in the table (exit status 1
when any run is missing, 2 for bad arguments).

Then for each variant: mean and sample standard deviation (n-1) over seeds of zero-shot i2t/t2i R@1 and R@5 and of
the align scores when present, and of the seconds per training step: the mean of metrics.jsonl `step_time` (the
engine's per-step wall time, data wait included, startup / eval / checkpoint time excluded), weighted by the steps
each record covers. The whole-subprocess wall time per step is kept per run too (`wall_s_per_step`). Written:
OUT/ablation.json (per-run values, aggregates, the exact commands, date, machine) and OUT/ablation.png (bars: variants
x metrics, error bars = std); the Markdown table is printed. --aggregate-only skips training (reads what is there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEMMIM = "semmim: {momentum: 0.9, num_prototypes: 256, proj_dim: 128, proj_hidden: 512, centering: sinkhorn}"  # demo
VARIANTS = [   # (name, label, objectives override)
    ("itc_itm_mlm", "ITC+ITM+MLM", "{itc: {}, itm: {pairs: b}, mlm: {}}"),
    ("plus_mgsc", "+MGSC", "{itc: {}, itm: {pairs: b}, mlm: {}, mgsc: {}}"),
    ("plus_mgsc_mltc", "+MGSC+MLTC (GLSCL)", "{itc: {}, itm: {pairs: b}, mlm: {}, mgsc: {}, mltc: {}}"),
    ("plus_semmim", "+SemMIM", "{itc: {}, itm: {pairs: b}, mlm: {}, " + SEMMIM + "}"),
    ("glscl_semmim", "GLSCL+SemMIM", "{itc: {}, itm: {pairs: b}, mlm: {}, mgsc: {}, mltc: {}, " + SEMMIM + "}"),
]
# overrides a variant needs besides its objectives (SemMIM masks patches with the ViT's own mask token; the other
# variants keep the config's ViT, so their init is the same as before)
VARIANT_SETS = {"plus_semmim": ["model.vision.mask_token=true"], "glscl_semmim": ["model.vision.mask_token=true"]}
RETRIEVAL_KEYS = ["i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"]
ALIGN_KEYS = ["align_global_box", "align_global_pixel", "align_local_box", "align_local_pixel"]
STEP_KEY = "s_per_step"
MANAGED = ("objectives", "train.seed", "train.max_steps", "data.align_bench")   # set by this script, not --set
RUN_META = "ablation_run.json"
RUN_LOG = "ablation.log"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def repo_path(rel: str) -> str:
    """A path of the repository, relative to the current directory when below it (shorter commands)."""
    path = os.path.join(REPO_ROOT, rel)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def build_command(variant_objectives: str, seed: int, steps: int, run_dir: str, config: str, ds_config: str,
                  align_bench: Optional[str], sets: list[str], variant_sets: tuple = ()) -> list[str]:
    cmd = [sys.executable, repo_path("train/pretrain.py"), "--deepspeed_config", ds_config, "--config", config,
           "--output_dir", run_dir, *sets, *variant_sets, f"objectives={variant_objectives}", f"train.seed={seed}",
           f"train.max_steps={steps}"]
    if align_bench:
        cmd.append(f"data.align_bench={align_bench}")
    return cmd


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def run_state(run_dir: str, steps: int, cmd: list[str]) -> str:
    """"new" (no dir or an empty one), "finished" (this command exited 0 and eval.json is at the last step),
    "resume" (this command was started there before: pretrain.py resumes it from its checkpoint), or "foreign"
    (the dir holds something else: another command's run, or files this script did not write)."""
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return "new"
    meta = _read_json(os.path.join(run_dir, RUN_META))
    if meta is None or meta.get("command", [None])[1:] != cmd[1:]:   # the python executable may differ
        return "foreign"
    ev = _read_json(os.path.join(run_dir, "eval.json"))
    if meta.get("exit_code") == 0 and ev is not None and ev.get("step") == steps:
        return "finished"
    return "resume"


def _write_meta(run_dir: str, meta: dict) -> None:
    tmp = os.path.join(run_dir, RUN_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, RUN_META))


def train_one(cmd: list[str], run_dir: str, env: dict) -> dict:
    """Run one pretraining subprocess, its output appended to RUN_DIR/ablation.log; RUN_META records the command
    before the start (exit_code null) and the exit status and wall time after."""
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, RUN_LOG)
    now = lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    meta = {"command": cmd, "exit_code": None, "wall_s": None, "started_at": now()}
    _write_meta(run_dir, meta)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n# {meta['started_at']}: {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    meta.update(exit_code=rc, wall_s=round(time.monotonic() - t0, 2), finished_at=now())
    _write_meta(run_dir, meta)
    return meta


def step_time(run_dir: str) -> Optional[float]:
    """Mean seconds per training step from metrics.jsonl `step_time` (each record's mean over the steps since the
    previous record), weighted by those steps; None without usable records. Torn or junk lines are skipped."""
    total = weight = 0.0
    prev = 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    step, t = int(rec["step"]), float(rec["step_time"])
                except (ValueError, KeyError, TypeError):
                    continue
                if step > prev and math.isfinite(t):
                    total += t * (step - prev)
                    weight += step - prev
                    prev = step
    except OSError:
        return None
    return total / weight if weight else None


def collect_run(run_dir: str, steps: int) -> dict:
    """The measured values of one run dir: eval metrics (eval.json at step `steps` only) and s/step."""
    ev = _read_json(os.path.join(run_dir, "eval.json")) or {}
    values = {}
    if ev.get("step") == steps:
        for k in RETRIEVAL_KEYS + ALIGN_KEYS:
            v = ev.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[k] = float(v)
    st = step_time(run_dir)
    if st is not None and values:
        values[STEP_KEY] = st
    return values


def mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(runs: list[dict], variants: list[str], seeds: list[int]) -> dict:
    """runs: [{"variant", "seed", "values": {metric: x}} ...] (values empty = the run is missing). Per variant:
    {"n_ok", "missing_seeds", "metrics": {metric: {"mean", "std" (sample, n-1; None for n < 2), "n", "values"}}}.
    Metrics: the retrieval keys, the align keys any run has, s/step."""
    present = [k for k in RETRIEVAL_KEYS + ALIGN_KEYS + [STEP_KEY] if any(k in r["values"] for r in runs)]
    out = {}
    for v in variants:
        by_seed = {r["seed"]: r["values"] for r in runs if r["variant"] == v}
        ok = [s for s in seeds if by_seed.get(s)]
        metrics = {}
        for k in present:
            xs = [by_seed[s][k] for s in ok if k in by_seed[s]]
            m, sd = mean_std(xs)
            metrics[k] = {"mean": m, "std": sd, "n": len(xs), "values": xs}
        out[v] = {"n_ok": len(ok), "missing_seeds": [s for s in seeds if s not in ok], "metrics": metrics}
    return out


def metric_label(k: str) -> str:
    if k == STEP_KEY:
        return "s/step"
    if k in RETRIEVAL_KEYS:
        d, r = k.split("_r")
        return f"{d} R@{r}"
    return k


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "missing"
    s = f"{stat['mean']:.{digits}f}"
    return s + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else " (n=1)")


def markdown_table(agg: dict, labels: dict, seeds: list[int]) -> str:
    metrics = next((list(a["metrics"]) for a in agg.values() if a["metrics"]), [])
    head = ["objectives", "runs"] + [metric_label(k) for k in metrics]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, a in agg.items():
        runs = f"{a['n_ok']}/{len(seeds)}"
        if a["missing_seeds"]:
            runs += " (missing seed " + ", ".join(map(str, a["missing_seeds"])) + ")"
        cells = [fmt(a["metrics"][k], 2 if k == STEP_KEY else 3) for k in metrics]
        rows.append("| " + " | ".join([labels.get(v, v), runs] + cells) + " |")
    return "\n".join(rows)


def plot(agg: dict, labels: dict, path: str, title: str) -> None:
    """Grouped bars: eval metrics on the left (one group per metric, one bar per variant), s/step on the right;
    error bars = sample std over seeds (none for n < 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = next((list(a["metrics"]) for a in agg.values() if a["metrics"]), [])
    evals = [k for k in metrics if k != STEP_KEY]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(max(7.0, 1.3 * len(evals) + 4), 4.2),
                                   gridspec_kw={"width_ratios": [max(len(evals), 1), 1.3]})
    n = max(len(agg), 1)
    width = 0.8 / n
    for i, (v, a) in enumerate(agg.items()):
        means = [a["metrics"][k]["mean"] if a["metrics"][k]["mean"] is not None else 0.0 for k in evals]
        errs = [a["metrics"][k]["std"] or 0.0 for k in evals]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(evals))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, color=f"C{i}", label=labels.get(v, v))
        if STEP_KEY in a["metrics"]:
            s = a["metrics"][STEP_KEY]
            ax_t.bar([i], [s["mean"] or 0.0], 0.7, yerr=[s["std"] or 0.0], capsize=3, color=f"C{i}")
    ax.set_xticks(range(len(evals)), [metric_label(k) for k in evals], rotation=20, ha="right")
    ax.set_ylabel("zero-shot score (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax_t.set_xticks(range(len(agg)), [labels.get(v, v) for v in agg], rotation=20, ha="right", fontsize=8)
    ax_t.set_title("s / training step", fontsize=10)
    ax_t.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        torch_version = version("torch")
    except Exception:   # not installed in this interpreter
        torch_version = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch": torch_version,
            "python": platform.python_version(), "platform": platform.platform(), "host": platform.node()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/ablation.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--config", default=repo_path("train/configs/demo.yaml"))
    p.add_argument("--deepspeed_config", default=repo_path("ds_configs/cpu_demo.json"))
    p.add_argument("--align-bench", dest="align_bench", default=None,
                   help="ALIGN-BENCH dir for data.align_bench (default data/demo/align_bench if it exists; none: off)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted override passed to every run (repeatable)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help=f"only these variants (default: all of {', '.join(v for v, _, _ in VARIANTS)})")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; aggregate the run dirs there")
    a = p.parse_args(argv)

    def error(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if a.steps < 1:
        return error(f"--steps: expected >= 1, got {a.steps}")
    known = [v for v, _, _ in VARIANTS]
    unknown = [v for v in a.variants or () if v not in known]
    if unknown:
        return error(f"--variants: unknown {unknown}; expected some of {known}")
    variants = [x for x in VARIANTS if a.variants is None or x[0] in a.variants]
    if len(set(a.seeds)) != len(a.seeds):
        return error(f"--seeds: repeated seed in {a.seeds}")
    for s in a.sets:
        key = s.split("=", 1)[0].strip()
        if "=" not in s or not key:
            return error(f"--set {s!r}: expected dotted.key=value")
        if any(key == m or key.startswith(m + ".") for m in MANAGED):
            return error(f"--set {s!r}: {key} is set by the ablation itself (use --seeds / --steps / --align-bench)")
    for path, what in ((a.config, "--config"), (a.deepspeed_config, "--deepspeed_config")):
        if not os.path.isfile(path):
            return error(f"{what} {path}: no such file")
    align = a.align_bench
    if align is None:
        default = repo_path(os.path.join("data", "demo", "align_bench"))
        align = default if os.path.isdir(default) else None
    elif align.lower() in ("none", ""):
        align = None
    elif not os.path.isdir(align):
        return error(f"--align-bench {align}: no such directory")

    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    # Every run is its own single-process job: a rendezvous inherited from the caller (an earlier in-process run
    # exports RANK/MASTER_PORT, a launcher its world) would make it join, or collide on, someone else's port.
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    plan = [(v, label, obj, s) for v, label, obj in variants for s in a.seeds]
    print(f"ablation: {len(variants)} variants x {len(a.seeds)} seeds = {len(plan)} runs of {a.steps} steps "
          f"({a.config}) -> {out}" + (f"; ALIGN-BENCH {align}" if align else "; no ALIGN-BENCH set"), flush=True)
    runs = []
    t_all = time.monotonic()
    for i, (v, label, obj, s) in enumerate(plan):
        rd = os.path.join(out, run_name(v, s))
        cmd = build_command(obj, s, a.steps, rd, a.config, a.deepspeed_config, align, a.sets, VARIANT_SETS.get(v, ()))
        log = os.path.join(rd, RUN_LOG)
        meta = _read_json(os.path.join(rd, RUN_META)) or {}
        state = run_state(rd, a.steps, cmd)
        reused = state == "finished"
        status = "ok"
        if state == "foreign" and not a.aggregate_only:
            status = "failed"
            print(f"[{i + 1}/{len(plan)}] {run_name(v, s)}: SKIPPED: {rd} holds another run (its {RUN_META} is "
                  f"missing or names another command); remove it or choose another --out", flush=True)
        elif a.aggregate_only or reused:
            print(f"[{i + 1}/{len(plan)}] {run_name(v, s)}: " + ("reused (finished)" if reused else "not trained "
                  "(--aggregate-only)"), flush=True)
        else:
            print(f"[{i + 1}/{len(plan)}] {'resuming' if state == 'resume' else 'starting'} {run_name(v, s)} "
                  f"({len(plan) - i - 1} remain after it); log {log}", flush=True)
            meta = train_one(cmd, rd, env)
            if meta["exit_code"] != 0:
                status = "failed"
                print(f"    FAILED (exit status {meta['exit_code']}) after {meta['wall_s']:.0f} s; log: {log}",
                      flush=True)
        values = collect_run(rd, a.steps)
        if status == "ok" and not values:
            status = "missing"
            if not a.aggregate_only:
                print(f"    no eval.json at step {a.steps}; log: {log}", flush=True)
        elif status == "ok":
            shown = " ".join(f"{k} {values[k]:.3f}" for k in values)
            print(f"    done: {shown}" + (f" ({meta['wall_s']:.0f} s)" if meta.get("wall_s") else ""), flush=True)
        if status != "ok":
            values = {}
        wall = meta.get("wall_s") if meta.get("exit_code") == 0 else None
        runs.append({"variant": v, "seed": s, "dir": rd, "log": log, "status": status, "reused": reused,
                     "exit_code": meta.get("exit_code"), "command": shlex.join(meta.get("command") or cmd),
                     "wall_s": wall, "wall_s_per_step": round(wall / a.steps, 3) if wall else None, "values": values})

    names = [v for v, _, _ in variants]
    labels = {v: label for v, label, _ in variants}
    agg = aggregate(runs, names, a.seeds)
    table = markdown_table(agg, labels, a.seeds)
    env_keys = ("DS_ACCELERATOR", "DS_BUILD_OPS", "DS_SKIP_SHM_OP", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"config": a.config, "deepspeed_config": a.deepspeed_config, "steps": a.steps, "seeds": a.seeds,
                     "align_bench": align, "extra_overrides": a.sets, "cwd": os.getcwd(),
                     "env": {k: os.environ[k] for k in env_keys if k in os.environ}},
        "variants": {v: {"label": label, "objectives": obj} for v, label, obj in variants},
        "metrics_note": {"i2t_r1..t2i_r5": "eval.json at the last step (zero-shot retrieval on data.eval)",
                         "align_*": "eval.json, when data.align_bench is set",
                         STEP_KEY: "mean of metrics.jsonl step_time weighted by steps per record (train loop only)",
                         "wall_s_per_step": "whole subprocess wall time / steps (startup, eval, checkpoints "
                                            "included; absent for runs not trained by this invocation unless "
                                            "recorded earlier)",
                         "std": "sample standard deviation over seeds (n-1); null for one seed"},
        "runs": runs,
        "aggregate": agg,
        "missing": [run_name(r["variant"], r["seed"]) for r in runs if r["status"] != "ok"],
        "total_wall_s": round(time.monotonic() - t_all, 1),
        "markdown": table,
    }
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=2)
    m = result["machine"]
    plot(agg, labels, os.path.join(out, "ablation.png"),
         f"{os.path.basename(a.config)}, {a.steps} steps, seeds {' '.join(map(str, a.seeds))}")
    print(f"\n{table}\n")
    print(f"{a.steps} steps per run, seeds {', '.join(map(str, a.seeds))}; mean ± sample std over seeds; s/step from "
          f"metrics.jsonl step_time; {m['cpu_model']} ({m['cpus_usable']} usable cores), torch {m['torch']}")
    if result["missing"]:
        print("missing runs: " + ", ".join(f"{r['dir']} (log {r['log']})" for r in runs if r["status"] != "ok"))
    print(f"wrote {os.path.join(out, 'ablation.json')} and {os.path.join(out, 'ablation.png')}")
    return 0 if not result["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
