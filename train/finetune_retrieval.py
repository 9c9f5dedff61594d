r"""Image-text retrieval fine-tuning (COCO 5k / Flickr30k 1k Karpathy test) on the shared engine and launcher.

  python train/convert_checkpoint.py to-finetune RUN/checkpoints OUT.safetensors
  deepspeed train/finetune_retrieval.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/coco_retrieval.yaml --init OUT.safetensors [--output_dir D] [key=value ...]
  ... --init runs/coco_ret --eval_only          (evaluate a fine-tuned run dir / file; no training)

Training: the objectives the config enables on the pretrained backbone: ITC + ITM with hard negatives (ALBEF /
SIMLA fine-tuning; captions of the same image are ITC positives and never ITM negatives), or `rank` (the official
SCL/ViLT rank head, initialised from the ITM head). Evaluation: ITC similarities for all pairs, then the top
task.k_i2t / task.k_t2i re-scored through the fusion encoder (ITM score, or the rank head when it is trained), split
over ranks; TR / IR R@1/5/10 and their mean (r_mean), which picks the best checkpoint (checkpoints/best).
Exit codes, resume, stop signals and the run directory are pretraining's (train/pretrain.py).
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


@dataclass
class AnnotationSource:
    format: Literal["albef", "karpathy", "msrvtt", "lsmdc"]
    annotations: list[str]                # the annotation file(s) of the format (msrvtt train: [data json, csv])
    # the directory the annotations' image / video paths are relative to, or "shards:PATTERN" (webdataset shards,
    # e.g. make_shards.py's or img2dataset's; media found by the basename of their path: datasets/shard_media.py)
    media_root: str
    split: Optional[list[str]] = None     # karpathy: e.g. [train, restval] or [test]

    def check(self, where: str) -> None:
        from datasets.shard_media import SHARDS_PREFIX
        from datasets.shards import expand_shards

        for i, path in enumerate(self.annotations):
            if not os.path.isfile(path):
                raise ValueError(f"{where}.annotations[{i}]: no such file {path!r}")
        if self.media_root.startswith(SHARDS_PREFIX):
            try:
                expand_shards(self.media_root[len(SHARDS_PREFIX):])
            except FileNotFoundError as e:
                raise ValueError(f"{where}.media_root: {e}") from None
        elif not os.path.isdir(self.media_root):
            raise ValueError(f"{where}.media_root: no such directory {self.media_root!r}")


@dataclass
class RetrievalTask(finetune.TaskSection):
    train: Optional[AnnotationSource] = None
    eval: Optional[AnnotationSource] = None
    modality: Literal["image", "video"] = "image"
    k_i2t: int = 256                      # texts re-scored per image (ALBEF COCO: 256, Flickr: 128)
    k_t2i: int = 128                      # images re-scored per text
    pair_batch_size: int = 64             # pairs per fusion call in the re-ranking
    # with --eval_only: also re-rank at each of these k (k_i2t = k_t2i = k) and write OUTPUT_DIR/k_report.json
    # (k, r_mean, seconds): what the re-ranking depth buys and costs; N = every item (the full cross-encoder)
    k_sweep: list[int] = field(default_factory=list)
    best_metric: str = "r_mean"

    def validate(self) -> None:
        if self.k_i2t < 1 or self.k_t2i < 1:
            raise ValueError(f"task.k_i2t / task.k_t2i must be >= 1, got {self.k_i2t} / {self.k_t2i}")
        if any(k < 1 for k in self.k_sweep):
            raise ValueError(f"task.k_sweep: every k must be >= 1, got {self.k_sweep}")
        if self.eval is None:
            raise ValueError("task.eval: missing (the retrieval test split: format, annotations, media_root)")
        if self.train is None and not self.eval_only:
            raise ValueError("task.train: missing (or run with --eval_only)")

    def check_files(self) -> None:
        for name in ("train", "eval"):
            src = getattr(self, name)
            if src is not None and not (name == "train" and self.eval_only):
                src.check(f"task.{name}")


def read_source(src: AnnotationSource, modality: str, what: str):
    from datasets.retrieval import read_retrieval
    from train.config import ConfigError

    try:
        rset = read_retrieval(src.format, src.annotations, src.media_root, src.split, modality)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    if not rset.texts:
        raise ConfigError(f"{what}: no usable caption in {src.annotations} (skipped: {dict(rset.skipped)})")
    if os.environ.get("RANK", "0") == "0":
        if rset.shard_index is not None:
            ix = rset.shard_index
            print(f"{what}: {len(ix)} media names indexed in {len(ix.urls)} shards of {src.media_root!r} "
                  f"({ix.duplicates} duplicate names, first kept; {len(ix.broken)} broken shards)", flush=True)
        if rset.skipped:
            print(f"{what}: {len(rset.media)} {modality}s, {len(rset.texts)} captions; skipped {dict(rset.skipped)}",
                  flush=True)
    return rset


def build(cfg, dist) -> launch.Built:
    from datasets.task_loader import TaskLoader, eval_batches
    from datasets.task_sets import MediaSet, RetrievalPairs, tokenize_texts
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.engine import seed_all
    from train.retrieval_eval import rerank_retrieval

    task, t = cfg.task, cfg.train
    tokenizer = load_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.objectives, tokenizer)
    finetune.load_init(model, task.init, new_prefixes=("objectives.",))
    seed_all(t.seed + dist.rank)
    test = read_source(task.eval, task.modality, "task.eval")
    if task.eval_only:
        loader = None
    else:
        pairs = RetrievalPairs(read_source(task.train, task.modality, "task.train"), cfg.data, tokenizer)
        loader = TaskLoader(pairs, cfg.data, batch_size=t.micro_batch_size, rank=dist.rank,
                            world_size=dist.world_size, seed=t.seed, name="task.train")
    texts = tokenize_texts(test.texts, tokenizer, cfg.data.max_text_len)
    pair_score = None
    if "rank" in cfg.objectives:
        from models.tasks.retrieval import rank_pair_score
        pair_score = rank_pair_score

    def evaluate(engine) -> dict:
        skipped = Counter()
        media = eval_batches(MediaSet(test, cfg.data), t.eval_batch_size, num_workers=cfg.data.num_workers,
                             skipped=skipped)
        out = rerank_retrieval(engine.module, engine.to_device, media, texts, test.txt2media, k_i2t=task.k_i2t,
                               k_t2i=task.k_t2i, rank=dist.rank, world_size=dist.world_size,
                               pair_batch_size=task.pair_batch_size, modality=task.modality, pair_score=pair_score)
        if task.eval_only and task.k_sweep:
            k_sweep(engine, media_fn=lambda: eval_batches(MediaSet(test, cfg.data), t.eval_batch_size,
                                                          num_workers=cfg.data.num_workers))
        return {**out, "eval_skipped": sum(test.skipped.values()) + sum(skipped.values())}

    def k_sweep(engine, media_fn) -> None:
        from train.engine import atomic_write_json
        from train.retrieval_eval import format_k_report, k_report
        rows = k_report(engine.module, engine.to_device, media_fn(), texts, test.txt2media, task.k_sweep,
                        rank=dist.rank, world_size=dist.world_size, pair_batch_size=task.pair_batch_size,
                        modality=task.modality, pair_score=pair_score)
        if dist.is_main:
            atomic_write_json(os.path.join(t.output_dir, "k_report.json"), [r._asdict() for r in rows])
            print("\n".join(["re-ranking depth (k_i2t = k_t2i = k) vs recall vs time:"] + format_k_report(rows)),
                  flush=True)

    return finetune.built(cfg, dist, model, loader, evaluate)


ENTRY = finetune.entry("train/finetune_retrieval.py", __doc__, RetrievalTask, build)


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
