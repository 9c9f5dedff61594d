r"""Vision-language pretraining entry point.

  deepspeed [--num_gpus N] train/pretrain.py --deepspeed_config ds_configs/X.json --config train/configs/Y.yaml \
      [--output_dir D] [--max_steps N] [dotted.key=value ...]
  python train/pretrain.py ...        (single process, same arguments)

An output dir that holds checkpoints (D/checkpoints/latest) is resumed automatically.
SIGUSR1 or SIGTERM: every rank finishes its step, all save a checkpoint, and the process exits 75
(EXIT_STOPPED; slurm/common.sh requeues the job on it). Exit 0: finished; 2: bad config; 3: diverged; other: crash.
"""
from __future__ import annotations

import os
import sys

# `python train/pretrain.py` puts train/ on sys.path, not the repo root that holds the models/datasets packages.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train import launch  # noqa: E402
from train.config import ConfigError  # noqa: E402
from train.launch import EXIT_STOPPED, StopOnSignal  # noqa: E402,F401  (re-exported for callers)


def text_masker(cfg, tokenizer):
    """data.mlm_probability set -> the data workers' MLM masking: the MLM objective's own rule
    (models/objectives/mlm.py build_masker, `objectives.mlm.masking`), so both paths mask alike; else None."""
    from models.objectives.mlm import MlmConfig, build_masker

    p = cfg.data.mlm_probability
    if p is None:
        return None
    return build_masker(cfg.objectives.get("mlm") or MlmConfig(mask_prob=p), tokenizer)


def init_from(model, path: str) -> None:
    """train.init_from: load a whole-model (`kind: vlp`) file strictly into `model`. Momentum copies the file lacks
    (one written before ITA was enabled, or an imported SCL checkpoint) start as copies of its online weights, as a
    fresh build makes them; anything else missing, unexpected or of another shape is one ConfigError naming it."""
    from models.momentum import online_key
    from models.weights import WeightsError, check_keys, load_weights

    try:
        sd, meta = load_weights(path)
        if meta.get("kind") != "vlp":
            raise WeightsError(f"{path}: not a whole-model file (kind={meta.get('kind')!r}); write one with "
                               "`python train/convert_checkpoint.py zero-to-fp32|import ...`")
        own = model.state_dict()
        for k in own:
            if k not in sd and online_key(k) in sd:
                sd[k] = sd[online_key(k)]
        check_keys(sd, own, f"train.init_from {path}")
    except WeightsError as e:
        raise ConfigError(str(e)) from None
    model.load_state_dict(sd, strict=True)


def build(cfg, dist) -> launch.Built:
    """Tokenizer, model (identical on every rank: the launcher seeded train.seed), train loader, retrieval eval."""
    from datasets.loader import build_eval_loader, build_train_loader
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.engine import seed_all
    from train.evaluation import zero_shot_retrieval

    t = cfg.train
    tokenizer = load_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.objectives, tokenizer)
    if t.init_from:
        init_from(model, t.init_from)
    seed_all(t.seed + dist.rank)   # different dropout / masking draws per rank from here on
    train_loader = build_train_loader(cfg.data, tokenizer, micro_batch_size=t.micro_batch_size, rank=dist.rank,
                                      world_size=dist.world_size, seed=t.seed,
                                      text_masker=text_masker(cfg, tokenizer))
    hooks = []
    if cfg.data.eval:
        eval_loader = build_eval_loader(cfg.data, tokenizer, batch_size=t.eval_batch_size)
        names = [s.display_name() for s in cfg.data.eval]
        hooks.append(lambda engine: zero_shot_retrieval(engine, eval_loader, names))
    if cfg.data.align_bench:   # ALIGN-BENCH scores merged into the same eval record (eval.json, loggers)
        from train.align_bench import eval_hook
        hooks.append(eval_hook(cfg.data.align_bench, tokenizer, cfg.data, batch_size=t.eval_batch_size))
    def evaluate(engine) -> dict:
        return {k: v for hook in hooks for k, v in hook(engine).items()}
    return launch.Built(model, train_loader, evaluate if hooks else None)


ENTRY = launch.Entry(prog="train/pretrain.py", description=__doc__, build=build)


def prepare(argv):
    return launch.prepare(ENTRY, argv)


def run(cfg, ds_config, engine_hook=None, stop: StopOnSignal | None = None) -> dict:
    return launch.run(ENTRY, cfg, ds_config, engine_hook=engine_hook, stop=stop)


def main(argv=None) -> int:
    # through this module's run(), looked up at call time: tests replace it to prove errors come before it
    return launch.main(ENTRY, argv, run_fn=lambda cfg, ds_config, stop: run(cfg, ds_config, stop=stop))


if __name__ == "__main__":
    sys.exit(main())
