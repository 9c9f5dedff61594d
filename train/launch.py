"""The launcher every training entry point shares (train/pretrain.py, the train/finetune_<task>.py scripts).

An entry point describes its program and builds its parts; the launcher does the rest, the same for all:

    ENTRY = launch.Entry(prog="train/finetune_vqa.py", description=__doc__, build=build)
    def build(cfg, dist) -> launch.Built: ...   # model, train loader, optional evaluate(engine) and setup(engine)
    def main(argv=None) -> int: return launch.main(ENTRY, argv)

main(): stop-signal handlers first (a signal during startup is remembered, not fatal), the launcher watch, then
parse arguments (options and dotted.key=value overrides, intermixed) -> prepare (config, ds_config and every check
that needs no model) -> init_distributed -> lock the run directory (rank 0) -> seed_all(train.seed) ->
entry.build(cfg, dist) -> Engine(..., resume=False) -> momentum parts (train/momentum.py attach_momentum, when the model
has momentum copies or queues) -> built.setup(engine) -> engine.resume() -> config.yaml ->
train. Exit status: 0 finished; 2 bad config or input (one `error:` line); 3 diverged; 75 (EXIT_STOPPED) stopped by
SIGUSR1/SIGTERM (or the launcher's death) after saving. Fine-tuning entries (`Entry.task_config`, train/finetune.py)
also take --init and --eval_only, merge --init's model config under the config's own `model:` keys, and with
--eval_only evaluate once instead of training. A multi-rank run that ends normally destroys its process group.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from train.config import ConfigError, config_to_dict, load_config

EXIT_DIVERGED = 3   # loss/gradients non-finite for train.max_skipped_steps steps, or non-finite weights at a save
EXIT_STOPPED = 75   # EX_TEMPFAIL: stopped on a signal after saving; must match slurm/common.sh
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Built:
    """What an entry point's build(cfg, dist) hands the launcher."""
    model: Any                                        # nn.Module returning {"loss", "losses", "stats"}
    train_loader: Any                                 # infinite iterable with state_dict() / load_state_dict()
    evaluate: Optional[Callable[[Any], dict]] = None  # evaluate(engine) -> metrics, on every rank
    setup: Optional[Callable[[Any], None]] = None     # setup(engine): register parts / after-step hooks, pre-resume


@dataclass(frozen=True)
class Entry:
    prog: str                                          # as the user types it: "train/pretrain.py"
    description: str                                   # --help text (the script's docstring)
    build: Callable[[Any, Any], Built]                 # build(cfg, dist) -> Built, after seed_all(train.seed)
    # fine-tuning entries (train/finetune.py): the `task:` section's dataclass; adds --init and --eval_only
    task_config: Optional[type] = None
    # entry-specific options, each a shorthand for one task override: {"--visualize": ("task.visualize", "help")}
    task_flags: tuple = ()


class StopOnSignal:
    """SIGUSR1/SIGTERM -> engine.request_stop(), also for a signal that arrives before the engine exists.

    The handler only sets flags (the engine all-reduces its flag at the next step boundary, so every rank stops at
    the same step and takes part in the save). A signal during startup is remembered and applied on attach().
    """

    def __init__(self):
        self.signum = None
        self.engine = None
        self._previous = {}

    def __call__(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if self.engine is not None:
            self.engine.request_stop()

    def install(self) -> "StopOnSignal":
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def attach(self, engine) -> None:
        self.engine = engine
        if self.signum is not None:
            engine.request_stop()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not usage + error
        raise ConfigError(f"{self.prog}: {message}")


def parse_args(entry: Entry, argv):
    p = _Parser(prog=entry.prog, description=entry.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--config", required=True, help="run config YAML (train/configs/*.yaml)")
    p.add_argument("--output_dir", help="run directory (default: train.output_dir, else runs/<config name>)")
    p.add_argument("--max_steps", type=int, help="same as train.max_steps=N")
    if entry.task_config is not None:
        p.add_argument("--init", help="weights to fine-tune from: convert_checkpoint.py to-finetune output, a whole-"
                       "model .safetensors or a DeepSpeed run/checkpoint dir (same as task.init=PATH)")
        p.add_argument("--eval_only", action="store_true", help="evaluate --init and exit (same as task.eval_only=true)")
    for flag, key, help_text in entry.task_flags:
        p.add_argument(flag, dest=key, metavar="N", help=f"{help_text} (same as {key}=N)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # appended by the launcher
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)        # DeepSpeed convention; no-op
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, values in YAML")
    # Options and overrides may be freely intermixed (`a.b=1 --max_steps 3 c.d=2`); plain parse_args would take
    # `c.d=2` for an unrecognized argument. Each override is checked to be dotted.key=value by load_config.
    args, extras = p.parse_known_intermixed_args(argv)
    unknown = [a for a in extras if a.startswith("-")]
    if unknown:   # argparse would also list every argument after it; name just the option
        extra = (", --init, --eval_only" + "".join(f", {f}" for f, _, _ in entry.task_flags)
                 if entry.task_config is not None else "")
        p.error(f"unrecognized option {unknown[0].split('=')[0]} (options: --deepspeed_config, --config, "
                f"--output_dir, --max_steps{extra}; config overrides are dotted.key=value)")
    args.overrides = list(args.overrides) + extras
    return args


def prepare(entry: Entry, argv):
    """Everything that can fail on bad input, before any heavy work: returns (cfg, ds_config).

    Every failure is a one-line ConfigError naming the file and the key (the checks live in train/checks.py)."""
    from train.checks import check_data_sources, check_ds_config, check_run_inputs
    from train.distributed import env_world_size
    from train.engine import load_ds_config, prepare_ds_config

    args = parse_args(entry, argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")   # JSON string = YAML string
    try:
        ds_raw = load_ds_config(args.deepspeed_config)
    except (OSError, UnicodeDecodeError) as e:   # a directory, no permission, a binary file
        raise ConfigError(f"{args.deepspeed_config}: cannot read DeepSpeed config: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    if entry.task_config is None:
        cfg = load_config(args.config, overrides)
    else:   # fine-tuning: --init's model config underneath the file's model keys (train/finetune.py)
        from train.config import load_tree
        from train.finetune import resolve_tree
        if args.init is not None:
            overrides.append(f"task.init={json.dumps(args.init)}")
        if args.eval_only:
            overrides.append("task.eval_only=true")
        for _, key, _ in entry.task_flags:
            if getattr(args, key) is not None:
                overrides.append(f"{key}={getattr(args, key)}")
        try:
            tree = resolve_tree(load_tree(args.config, overrides))
        except ConfigError as e:
            raise ConfigError(e if str(e).startswith(args.config) else f"{args.config}: {e}") from None
        cfg = load_config(args.config, task_cls=entry.task_config, tree=tree)
    check_ds_config(ds_raw, args.deepspeed_config)
    world_size = env_world_size()
    ds_config = prepare_ds_config(ds_raw, cfg.train, world_size, path=args.deepspeed_config)
    check_run_inputs(cfg, args.config, need_train_sources=entry.task_config is None)
    if entry.task_config is None:   # shards; a task's annotation files are checked by its section below
        check_data_sources(cfg, args.config, world_size)
    if entry.task_config is not None and callable(getattr(cfg.task, "check_files", None)):
        try:
            cfg.task.check_files()   # annotation files and media roots exist: one line naming the key
        except ValueError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    return cfg, ds_config


def run(entry: Entry, cfg, ds_config, engine_hook=None, stop: StopOnSignal | None = None) -> dict:
    """Build the entry's parts, then train; returns engine.train()'s result. `engine_hook(engine)` runs just before
    training (tests). `stop`: handlers installed by the caller (main installs them before the heavy imports);
    without it run() installs its own for its duration."""
    from deepspeed.utils import logger as ds_logger

    from train.distributed import init_distributed

    ds_logger.setLevel(logging.WARNING)   # our progress bar and metrics replace DeepSpeed's per-step chatter
    dist = init_distributed()
    lock = lock_run_dir(cfg.train.output_dir, dist)
    try:
        return _run_locked(entry, cfg, ds_config, dist, engine_hook, stop)
    finally:
        if lock is not None:
            lock.release()


def lock_run_dir(output_dir: str, dist):
    """Rank 0 locks the run directory for the run's life; every rank learns whether it got it."""
    from train.distributed import max_over_ranks
    from train.rundir import RunDirBusy, RunDirLock

    lock, busy = None, None
    if dist.is_main:
        try:
            lock = RunDirLock(output_dir).acquire()
        except RunDirBusy as e:
            busy = e
    someone_busy = max_over_ranks(busy is not None, dist.device) > 0
    if busy is not None:
        raise busy
    if someone_busy:
        raise ConfigError(f"{output_dir}: in use by another run (rank 0 says which)")
    return lock


def _run_locked(entry: Entry, cfg, ds_config, dist, engine_hook, stop):
    import yaml

    from train.engine import Engine, atomic_write_bytes, seed_all
    from train.momentum import attach_momentum

    t = cfg.train
    seed_all(t.seed)   # same seed everywhere: every rank builds identical initial weights
    built = entry.build(cfg, dist)
    run_config = config_to_dict(cfg)
    engine = Engine(built.model, t, ds_config, dist, built.train_loader, t.output_dir, evaluate=built.evaluate,
                    run_config=run_config, resume=False)
    try:   # released on every path: see Engine.close
        attach_momentum(engine)   # any model with momentum encoders / queues: EMA hook + checkpoint parts
        if built.setup is not None:
            built.setup(engine)   # checkpoint parts and after-step hooks exist before the resume reads them
        if getattr(cfg.task, "eval_only", False):   # fine-tuning --eval_only: evaluate the --init weights only
            stop_eval = stop or StopOnSignal()
            stop_eval.attach(engine)
            result = engine.evaluate() or {}
            return {"step": 0, "stopped": False, "ranks_in_sync": None, "saved": None, "eval": result}
        engine.resume()
        if dist.is_main:
            atomic_write_bytes(os.path.join(t.output_dir, "config.yaml"),
                               yaml.safe_dump(run_config, sort_keys=False).encode())
        if engine_hook is not None:
            engine_hook(engine)
        # SIGUSR1 (SLURM's --signal before a time limit, forwarded by slurm/common.sh) or SIGTERM (scancel,
        # preemption): finish the step, save on every rank, return {"stopped": True, ...}.
        own_stop = stop is None
        if own_stop:
            stop = StopOnSignal().install()
        try:
            stop.attach(engine)
            return engine.train()
        finally:
            if own_stop:
                stop.restore()
    finally:
        engine.close()


def _say(msg: str, rank_zero_only: bool) -> None:
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if rank_zero_only and rank != "0":
        return
    prefix = f"[rank {rank}] " if world != "1" and not rank_zero_only else ""
    print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)


def shutdown_distributed() -> None:
    """After a run that ended normally on every rank (finished, or stopped after the save): a barrier, then the
    process group destroyed while the interpreter is whole. A multi-rank gloo process that exits with its group alive
    can abort in the group's destructor at interpreter exit ("terminate called without an active exception", rc -6;
    pytorch/pytorch#190489). Single-process runs keep their group (tests run several in one process). Not called on
    errors: the other ranks may be blocked in a collective, and the barrier would hang."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(entry: Entry, argv=None, run_fn=None) -> int:
    """0: finished; 2: bad config or input; 3: diverged; EXIT_STOPPED (75): stopped by SIGUSR1/SIGTERM (or the
    launcher's death) after saving a checkpoint. `run_fn(cfg, ds_config, stop=...)` replaces run(entry, ...)
    (an entry point passes its own module-level run, so that tests can swap it)."""
    stop = StopOnSignal().install()   # before the heavy imports: a signal during startup must not kill us
    from train.rundir import LauncherWatch
    LauncherWatch().start()
    try:
        try:
            cfg, ds_config = prepare(entry, sys.argv[1:] if argv is None else argv)
        except ConfigError as e:
            _say(str(e), rank_zero_only=True)   # every rank fails the same way; say it once
            return 2
        from datasets.loader import DataAbort
        from train.checkpoint_io import CheckpointError
        from train.engine import TrainingDiverged
        from train.rundir import RunDirBusy
        try:
            if run_fn is None:
                result = run(entry, cfg, ds_config, stop=stop)
            else:
                result = run_fn(cfg, ds_config, stop=stop)
        except (ConfigError, CheckpointError, RunDirBusy, DataAbort) as e:   # bad input found while running
            _say(str(e), rank_zero_only=False)
            return 2
        except TrainingDiverged as e:
            _say(str(e), rank_zero_only=True)
            return EXIT_DIVERGED
        shutdown_distributed()
    finally:
        stop.restore()
    if result.get("stopped"):
        if os.environ.get("RANK", "0") == "0":
            if result.get("saved"):
                what = f"after saving checkpoint {result['saved']}"
            elif result["step"] > 0:
                what = f"with nothing new to save (checkpoint step_{result['step']} is current)"
            else:
                what = "before the first step; nothing to save"
            print(f"stopped by {stop.name} at step {result['step']} {what}; exit {EXIT_STOPPED} "
                  f"(run the same command again to resume)", flush=True)
        return EXIT_STOPPED
    return 0
