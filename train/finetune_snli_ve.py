r"""SNLI-VE (visual entailment) fine-tuning on the shared engine and launcher: a 3-way classifier.

  deepspeed train/finetune_snli_ve.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/snli_ve.yaml --init OUT.safetensors [--output_dir D] [key=value ...]
  ... --init runs/snli_ve --eval_only                    (evaluate a fine-tuned run on val and test)

Data (datasets/snli_ve.py): necla-ml/SNLI-VE's snli_ve_{train,dev,test}.jsonl (one JSON object a line: Flickr30K_ID,
sentence2 = the hypothesis, gold_label entailment / neutral / contradiction) over the Flickr30k images,
image_root/<Flickr30K_ID>.jpg (flickr30k-images/). task.train: a list of sources, task.eval: dev, task.test: test.
Head (models/tasks/classify.py): the SCL-style MLP on the pooled fusion features (2h -> 2h -> 3), cross-entropy.
SCL releases no SNLI-VE recipe (its code names an snli_classifier but has no config); the config follows
ALBEF / SIMLA's (configs/VE.yaml). Metric: accuracy on task.eval (`acc`, picks the best checkpoint) and task.test
(`test_acc`) at every evaluation; a hypothesis whose image cannot be read counts as wrong (`missing`).
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


@dataclass
class SnliVeSource(finetune.AnnotatedImages):
    annotations: str                      # snli_ve_<split>.jsonl
    image_root: str                       # Flickr30k's flickr30k-images/ (<Flickr30K_ID>.jpg)


@dataclass
class SnliVeTask(finetune.TrainEvalTest, finetune.TaskSection):
    train: list[SnliVeSource] = field(default_factory=list)
    eval: Optional[SnliVeSource] = None   # dev
    test: Optional[SnliVeSource] = None
    best_metric: str = "acc"

    def validate(self) -> None:
        self.validate_splits()


def read_items(src: SnliVeSource, what: str) -> list:
    from datasets.snli_ve import read_snli_ve

    return finetune.read_split(read_snli_ve, src, what, "hypotheses")


def build(cfg, dist) -> launch.Built:
    from datasets.snli_ve import LABELS
    from datasets.task_loader import TaskLoader
    from datasets.task_sets_pairs import SnliVeSet
    from models.backbone import pooled_dim
    from models.tasks.base import TaskModel
    from models.tasks.classify import ImageTextClassifier
    from models.text import load_tokenizer
    from train.classify_eval import split_evaluator
    from train.engine import seed_all

    task, t = cfg.task, cfg.train
    tokenizer = load_tokenizer(cfg.model.text)
    train_items = [] if task.eval_only else \
        [it for i, src in enumerate(task.train) for it in read_items(src, f"task.train[{i}]")]
    splits = {name: SnliVeSet(read_items(src, f"task.{name}"), cfg.data, tokenizer, train=False)
              for name in ("eval", "test") if (src := getattr(task, name)) is not None}
    cfg.model.heads = []   # the pretraining heads (ITC, ITM) are not used: listed as dropped by the init load
    model = TaskModel(cfg.model, ImageTextClassifier(pooled_dim(cfg.model), len(LABELS), "snli_ve"))
    finetune.load_init(model, task.init)
    seed_all(t.seed + dist.rank)
    loader = None
    if not task.eval_only:
        loader = TaskLoader(SnliVeSet(train_items, cfg.data, tokenizer, train=True), cfg.data,
                            batch_size=t.micro_batch_size, rank=dist.rank, world_size=dist.world_size, seed=t.seed,
                            name="task.train")
    return finetune.built(cfg, dist, model, loader, split_evaluator(cfg, dist, splits))


ENTRY = finetune.entry("train/finetune_snli_ve.py", __doc__, SnliVeTask, build)


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
