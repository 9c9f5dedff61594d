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
from train.launch import EXIT_STOPPED, StopOnSignal  # noqa: E402,F401  (re-exported for callers)


def text_masker(data_cfg, tokenizer):
    """data.mlm_probability set -> the data workers' MLM masking (models.masking.bert_mask, the rule the MLM
    objective applies on the device); else None."""
    import functools

    import torch

    from models.masking import bert_mask

    if data_cfg.mlm_probability is None:
        return None
    return functools.partial(bert_mask, special_ids=torch.tensor(sorted({int(i) for i in tokenizer.all_special_ids})),
                             mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                             probability=data_cfg.mlm_probability)


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
    seed_all(t.seed + dist.rank)   # different dropout / masking draws per rank from here on
    train_loader = build_train_loader(cfg.data, tokenizer, micro_batch_size=t.micro_batch_size, rank=dist.rank,
                                      world_size=dist.world_size, seed=t.seed,
                                      text_masker=text_masker(cfg.data, tokenizer))
    evaluate = None
    if cfg.data.eval:
        eval_loader = build_eval_loader(cfg.data, tokenizer, batch_size=t.eval_batch_size)
        names = [s.display_name() for s in cfg.data.eval]
        evaluate = lambda engine: zero_shot_retrieval(engine, eval_loader, names)  # noqa: E731
    return launch.Built(model, train_loader, evaluate)


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
