r"""NLVR2 fine-tuning on the shared engine and launcher: SCL / ViLT's two-pass classifier over the image pair.

  deepspeed train/finetune_nlvr2.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/nlvr2.yaml --init OUT.safetensors [--output_dir D] [key=value ...]
  ... --init runs/nlvr2 --eval_only                      (evaluate a fine-tuned run on dev and test-P)

Data (datasets/nlvr2.py): lil-lab/nlvr's nlvr2/data/{train,dev,test1}.json (one JSON object a line: identifier,
sentence, label "True"/"False", train's `directory`) with each split's image directory as ViLT / SCL lay it out:
task.train: [{annotations: .../train.json, image_root: .../images/train}] (images in <image_root>/<directory>/),
task.eval: dev.json + dev/, task.test: test1.json (test-P) + test1/. An example's images are
<identifier minus its last "-N">-img0.png (left) and -img1.png (right).
Model: the --init backbone with a third modality type (model.fusion.num_token_types 3, set here; the new row is
a copy of the image row, as SCL does); head (models/tasks/nlvr2.py): a fusion pass per image (types 1 and 2), the
two pooled features concatenated (4 x hidden) -> MLP -> 2, cross-entropy. Metric: accuracy on task.eval (`acc`,
picks the best checkpoint) and task.test (`test_acc`), both at every evaluation (SCL logs dev and test-P together);
an example whose images cannot be read counts as wrong (`missing`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train import finetune, launch  # noqa: E402
from train.config import ConfigError  # noqa: E402

NUM_TOKEN_TYPES = 3   # text 0, left image 1, right image 2


@dataclass
class Nlvr2Source(finetune.AnnotatedImages):
    annotations: str                      # nlvr2/data/<split>.json (JSON lines)
    image_root: str                       # images/train (per-`directory` sub-folders), dev, test1


@dataclass
class Nlvr2Task(finetune.TrainEvalTest, finetune.TaskSection):
    train: list[Nlvr2Source] = field(default_factory=list)
    eval: Optional[Nlvr2Source] = None    # dev
    test: Optional[Nlvr2Source] = None    # test-P (test1)
    best_metric: str = "acc"

    def validate(self) -> None:
        self.validate_splits()


def read_items(src: Nlvr2Source, what: str) -> list:
    from datasets.nlvr2 import read_nlvr2

    return finetune.read_split(read_nlvr2, src, what, "examples")


def build(cfg, dist) -> launch.Built:
    from datasets.task_loader import TaskLoader
    from datasets.task_sets_pairs import Nlvr2Set
    from models.tasks.base import TaskModel
    from models.tasks.nlvr2 import Nlvr2Head
    from models.text import load_tokenizer
    from train.classify_eval import split_evaluator
    from train.engine import seed_all

    task, t = cfg.task, cfg.train
    if cfg.model.family != "coattention":
        raise ConfigError(f"model.family: NLVR2 fine-tuning needs the coattention family (its two passes tell the images "
                          f"apart by modality type); SIMLA's NLVR2 model (an 18-layer BERT with duplicated layers and a "
                          f"text-assignment pre-stage) is not implemented, got {cfg.model.family!r}")
    tokenizer = load_tokenizer(cfg.model.text)
    train_items = [] if task.eval_only else \
        [it for i, src in enumerate(task.train) for it in read_items(src, f"task.train[{i}]")]
    splits = {name: Nlvr2Set(read_items(src, f"task.{name}"), cfg.data, tokenizer, train=False)
              for name in ("eval", "test") if (src := getattr(task, name)) is not None}
    cfg.model.heads = []   # the pretraining heads (ITC, ITM) are not used: listed as dropped by the init load
    cfg.model.fusion.num_token_types = max(cfg.model.fusion.num_token_types, NUM_TOKEN_TYPES)
    model = TaskModel(cfg.model, Nlvr2Head(cfg.model.fusion.hidden_size))
    finetune.load_init(model, task.init)
    seed_all(t.seed + dist.rank)
    loader = None
    if not task.eval_only:
        loader = TaskLoader(Nlvr2Set(train_items, cfg.data, tokenizer, train=True), cfg.data,
                            batch_size=t.micro_batch_size, rank=dist.rank, world_size=dist.world_size, seed=t.seed,
                            name="task.train")
    return finetune.built(cfg, dist, model, loader, split_evaluator(cfg, dist, splits))


ENTRY = finetune.entry("train/finetune_nlvr2.py", __doc__, Nlvr2Task, build)


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
