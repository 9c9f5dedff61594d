"""Vision-language pretraining entry point.

  deepspeed [--num_gpus N] train/pretrain.py --deepspeed_config ds_configs/X.json --config train/configs/Y.yaml \
      [--output_dir D] [--max_steps N] [dotted.key=value ...]
  python train/pretrain.py ...        (single process, same arguments)

An output dir that holds checkpoints (D/checkpoints/latest) is resumed automatically.
SIGUSR1 or SIGTERM: every rank finishes its step, all save a checkpoint, and the process exits 75
(EXIT_STOPPED; slurm/common.sh requeues the job on it). Exit 0: finished; 2: bad config; other: crash.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

# `python train/pretrain.py` puts train/ on sys.path, not the repo root that holds the models/datasets packages.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train.config import ConfigError, config_to_dict, load_config  # noqa: E402


EXIT_STOPPED = 75   # EX_TEMPFAIL: stopped on a signal after saving; must match slurm/common.sh
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


def parse_args(argv):
    p = _Parser(prog="train/pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--config", required=True, help="run config YAML (train/configs/*.yaml)")
    p.add_argument("--output_dir", help="run directory (default: train.output_dir, else runs/<config name>)")
    p.add_argument("--max_steps", type=int, help="same as train.max_steps=N")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # appended by the launcher
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)        # DeepSpeed convention; no-op
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, values in YAML")
    return p.parse_args(argv)


def prepare(argv):
    """Everything that can fail on bad input, before any heavy work: returns (cfg, ds_config)."""
    from train.distributed import env_world_size
    from train.engine import load_ds_config, prepare_ds_config

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")   # JSON string = YAML string
    ds_raw = load_ds_config(args.deepspeed_config)
    cfg = load_config(args.config, overrides)
    check_run_inputs(cfg, args.config)
    ds_config = prepare_ds_config(ds_raw, cfg.train, env_world_size(), path=args.deepspeed_config)
    return cfg, ds_config


def check_run_inputs(cfg, path: str) -> None:
    """What only a real run needs (presets ship placeholder paths that flops.py and the tests accept)."""
    vision, text = cfg.model.vision, cfg.model.text
    if vision.pretrained and not os.path.isfile(vision.pretrained):
        raise ConfigError(f"{path}: model.vision.pretrained: no such file {vision.pretrained!r} (write it with "
                          "`python train/convert_checkpoint.py import ...`)")
    if text.pretrained not in (None, "minilm") and not os.path.isdir(text.pretrained):
        raise ConfigError(f"{path}: model.text.pretrained: no such directory {text.pretrained!r} (a local "
                          "transformers BERT/RoBERTa directory, or minilm)")
    p = cfg.data.mlm_probability
    if p is not None:
        mlm = cfg.objectives.get("mlm")
        if mlm is None:
            raise ConfigError(f"{path}: data.mlm_probability is set but objectives.mlm is not enabled")
        if abs(mlm.mask_prob - p) > 1e-9:
            raise ConfigError(f"{path}: data.mlm_probability={p} disagrees with objectives.mlm.mask_prob="
                              f"{mlm.mask_prob}; the collator masks instead of the model, so they must match")


def run(cfg, ds_config, engine_hook=None, stop: StopOnSignal | None = None) -> dict:
    """Build tokenizer, model and loaders, then train. `engine_hook(engine)` runs just before training (tests,
    later task scripts). `stop`: handlers installed by the caller (main installs them before the heavy imports);
    without it run() installs its own for its duration."""
    import yaml
    from deepspeed.utils import logger as ds_logger

    from datasets.loader import build_eval_loader, build_train_loader
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.distributed import init_distributed
    from train.engine import Engine, atomic_write_bytes, seed_all
    from train.evaluation import zero_shot_retrieval

    ds_logger.setLevel(logging.WARNING)   # our progress bar and metrics replace DeepSpeed's per-step chatter
    dist = init_distributed()
    t = cfg.train
    seed_all(t.seed)   # same seed everywhere: every rank builds identical initial weights
    tokenizer = load_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.objectives, tokenizer)
    seed_all(t.seed + dist.rank)   # different dropout / masking draws per rank from here on
    train_loader = build_train_loader(cfg.data, tokenizer, micro_batch_size=t.micro_batch_size, rank=dist.rank,
                                      world_size=dist.world_size, seed=t.seed)
    evaluate = None
    if cfg.data.eval:
        eval_loader = build_eval_loader(cfg.data, tokenizer, batch_size=t.eval_batch_size)
        names = [s.display_name() for s in cfg.data.eval]
        evaluate = lambda engine: zero_shot_retrieval(engine, eval_loader, names)  # noqa: E731
    run_config = config_to_dict(cfg)
    engine = Engine(model, t, ds_config, dist, train_loader, t.output_dir, evaluate=evaluate, run_config=run_config)
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


def main(argv=None) -> int:
    """0: finished; 2: bad config; EXIT_STOPPED (75): stopped by SIGUSR1/SIGTERM after saving a checkpoint."""
    stop = StopOnSignal().install()   # before the heavy imports: a signal during startup must not kill us
    try:
        try:
            cfg, ds_config = prepare(sys.argv[1:] if argv is None else argv)
        except ConfigError as e:
            if os.environ.get("RANK", "0") == "0":   # every rank fails the same way; say it once
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        try:
            result = run(cfg, ds_config, stop=stop)
        except ConfigError as e:   # found while building (e.g. an lr_multipliers prefix that matches nothing)
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    finally:
        stop.restore()
    if result.get("stopped"):
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped by {stop.name} at step {result['step']} after saving a checkpoint; exit {EXIT_STOPPED} "
                  f"(run the same command again to resume)", flush=True)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
