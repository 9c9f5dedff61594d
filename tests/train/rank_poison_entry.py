"""Test entry point (not collected): train/pretrain.py's run, with rank 1's loss *value* made NaN at one forward
while its gradient stays finite, so that only that rank's loss check can see it. Used by test_hard_to_break."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from train import pretrain  # noqa: E402

POISON_FORWARD = 2   # 0-based forward call on rank 1 (gradient accumulation 1: the third step)


def hook(engine):
    if engine.dist.rank != 1:
        return
    calls = []

    def poison(module, args, out):
        calls.append(1)
        if len(calls) - 1 == POISON_FORWARD:
            loss = out["loss"]
            return {**out, "loss": loss + (float("nan") - loss.detach())}   # value NaN, gradient unchanged
        return None
    engine.module.register_forward_hook(poison)


if __name__ == "__main__":
    # the fingerprint runs only when asked; the test reads its verdict from the exit status
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")] + ["train.check_ranks_in_sync=true"]
    cfg, ds = pretrain.prepare(argv)
    result = pretrain.run(cfg, ds, engine_hook=hook)
    sys.exit(0 if result["ranks_in_sync"] else 1)
