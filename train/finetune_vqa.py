r"""VQAv2 fine-tuning on the shared engine and launcher: the SCL/ViLT classifier over the answer vocabulary.

  deepspeed train/finetune_vqa.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/vqav2.yaml --init OUT.safetensors [--output_dir D] [key=value ...]
  ... --init runs/vqa --eval_only task.answer_vocab=runs/vqa/answer_vocab.json   (evaluate, write the test file)

Data: the official VQAv2 question / annotation JSON (task.train: train + val, optionally VG-QA in the same layout;
task.eval: a split with annotations; task.test: test-dev questions). Answers are normalised as the official VQA
evaluation does; the vocabulary is ViLT/SCL's (answers seen >= 9 times, 3129 on train + val; task.vocab_rule) or
task.answer_vocab,
saved as OUTPUT_DIR/answer_vocab.json. Head: MLP on the pooled fusion features; loss: BCE against ViLT's soft
scores x the number of answers (ViLT/SCL). Metric: VQA accuracy (min(#humans/3, 1) averaged over the 10 choose 9
subsets of the human answers), vqa_acc, which picks the best checkpoint. With task.test set, the final evaluation
(and --eval_only) writes OUTPUT_DIR/vqa_test_predictions.json in the EvalAI submission format.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train import finetune, launch  # noqa: E402
from train.config import ConfigError  # noqa: E402

TEST_FILE = "vqa_test_predictions.json"
VOCAB_FILE = "answer_vocab.json"


@dataclass
class VqaSource:
    questions: str                        # v2_OpenEnded_mscoco_<split>_questions.json
    image_root: str                       # the directory of the split's images
    annotations: Optional[str] = None     # v2_mscoco_<split>_annotations.json (none for test / test-dev)
    image_pattern: str = "COCO_{data_subtype}_{image_id:012d}.jpg"

    def check(self, where: str) -> None:
        for key in ("questions", "annotations"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{where}.{key}: no such file {path!r}")
        if not os.path.isdir(self.image_root):
            raise ValueError(f"{where}.image_root: no such directory {self.image_root!r}")


@dataclass
class VqaTask(finetune.TaskSection):
    train: list[VqaSource] = field(default_factory=list)
    eval: Optional[VqaSource] = None
    test: Optional[VqaSource] = None
    answer_vocab: Optional[str] = None    # a JSON list of answers; default: built from task.train by vocab_rule
    # "vilt": ViLT/METER/SCL's rule, each question's multiple_choice_answer kept when seen >= vocab_min_count times,
    # in first-seen order (train2014 + val2014, 9 -> their 3129 answers, in their label order); "top_k": the
    # vocab_size most frequent of all human answers
    vocab_rule: Literal["vilt", "top_k"] = "vilt"
    vocab_min_count: int = 9
    vocab_size: int = 3129
    best_metric: str = "vqa_acc"

    def validate(self) -> None:
        if self.vocab_size < 2 or self.vocab_min_count < 1:
            raise ValueError(f"task.vocab_size must be >= 2 and task.vocab_min_count >= 1, got {self.vocab_size} / "
                             f"{self.vocab_min_count}")
        if not self.train and not (self.eval_only and self.answer_vocab):
            raise ValueError("task.train: lists no source (with --eval_only, give task.answer_vocab instead)")
        if self.eval is None and self.test is None:
            raise ValueError("task.eval / task.test: set at least one")
        for src in self.train:
            if src.annotations is None:
                raise ValueError("task.train: every training source needs its annotations file")

    def check_files(self) -> None:
        for i, src in enumerate(self.train):
            src.check(f"task.train[{i}]")
        for name in ("eval", "test"):
            if getattr(self, name) is not None:
                getattr(self, name).check(f"task.{name}")
        if self.answer_vocab is not None and not os.path.isfile(self.answer_vocab):
            raise ValueError(f"task.answer_vocab: no such file {self.answer_vocab!r}")


def read_items(src: VqaSource, what: str) -> list:
    from datasets.vqa import read_vqa

    try:
        items, skipped = read_vqa(src.questions, src.annotations, src.image_root, image_pattern=src.image_pattern)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    if skipped and os.environ.get("RANK", "0") == "0":
        print(f"{what}: {len(items)} questions; skipped {dict(skipped)}", flush=True)
    return items


def answer_vocab(task, train_items: list, output_dir: str, is_main: bool) -> list[str]:
    from datasets.vqa import build_answer_vocab, build_answer_vocab_vilt, load_answer_vocab, save_answer_vocab

    saved = os.path.join(output_dir, VOCAB_FILE)
    path = task.answer_vocab or (saved if os.path.isfile(saved) else None)   # a resumed run keeps its vocabulary
    try:
        if path:
            vocab = load_answer_vocab(path)
        elif task.vocab_rule == "vilt":
            vocab = build_answer_vocab_vilt(train_items, task.vocab_min_count)
        else:
            vocab = build_answer_vocab(train_items, task.vocab_size)
    except ValueError as e:
        raise ConfigError(f"task.answer_vocab: {e}") from None
    if len(vocab) < 2:
        raise ConfigError(f"task.train: only {len(vocab)} answer(s) pass task.vocab_rule {task.vocab_rule!r} "
                          f"(vocab_min_count {task.vocab_min_count}); lower it or give task.answer_vocab")
    if is_main and path != saved:
        os.makedirs(output_dir, exist_ok=True)
        save_answer_vocab(saved, vocab)
    return vocab


def build(cfg, dist) -> launch.Built:
    from datasets.task_loader import TaskLoader, eval_batches
    from datasets.task_sets import VqaSet
    from models.backbone import pooled_dim
    from models.tasks.base import TaskModel
    from models.tasks.vqa import VqaHead
    from models.text import load_tokenizer
    from train.engine import seed_all
    from train.vqa_eval import evaluate_vqa

    task, t = cfg.task, cfg.train
    tokenizer = load_tokenizer(cfg.model.text)
    train_items = [it for i, src in enumerate(task.train) for it in read_items(src, f"task.train[{i}]")]
    vocab = answer_vocab(task, train_items, t.output_dir, dist.is_main)
    cfg.model.heads = []   # the pretraining heads (ITC, ITM) are not used: listed as dropped by the init load
    model = TaskModel(cfg.model, VqaHead(pooled_dim(cfg.model), len(vocab)))
    finetune.load_init(model, task.init)
    seed_all(t.seed + dist.rank)
    loader = None
    if not task.eval_only:
        loader = TaskLoader(VqaSet(train_items, vocab, cfg.data, tokenizer, train=True), cfg.data,
                            batch_size=t.micro_batch_size, rank=dist.rank, world_size=dist.world_size, seed=t.seed,
                            name="task.train")
    splits = {name: (VqaSet(read_items(src, f"task.{name}"), vocab, cfg.data, tokenizer, train=False))
              for name in ("eval", "test") if (src := getattr(task, name)) is not None}

    def run_split(engine, name: str, result_path: Optional[str]) -> dict:
        skipped = Counter()
        data = splits[name]
        batches = eval_batches(data, t.eval_batch_size, num_workers=cfg.data.num_workers, rank=dist.rank,
                               world_size=dist.world_size, shard=True, skipped=skipped)
        out = evaluate_vqa(engine.module, batches, engine.to_device, vocab, data.items, dist.rank, dist.world_size,
                           result_path)
        return {**out, f"{name}_skipped": sum(skipped.values())}

    def evaluate(engine) -> dict:
        out = run_split(engine, "eval", None) if "eval" in splits else {}
        final = task.eval_only or engine.step >= t.max_steps
        if "test" in splits and final:
            test = run_split(engine, "test", os.path.join(t.output_dir, TEST_FILE))
            out["test_skipped"] = test["test_skipped"]
            out["test_questions"] = test.get("vqa_num_questions", 0)
        return out

    return finetune.built(cfg, dist, model, loader, evaluate)


ENTRY = finetune.entry("train/finetune_vqa.py", __doc__, VqaTask, build)


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
