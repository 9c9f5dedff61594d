r"""RefCOCO+ weakly supervised visual grounding (ALBEF / SIMLA style) on the shared engine and launcher.

  deepspeed train/finetune_grounding.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/refcoco_grounding.yaml --init OUT.safetensors [--output_dir D] [key=value ...]
  ... --init runs/refcoco --eval_only [--visualize 16]     (evaluate a fine-tuned run dir / file; no training)

Training sees no box: the pretraining model's ITC + ITM (hard negatives; expressions of the same image are ITC
positives and never ITM negatives) are fine-tuned on (image, expression) pairs of RefCOCO+ train, exactly as
retrieval fine-tuning (datasets/task_sets.py RetrievalPairs over datasets/grounding.py read_grounding_train).
Evaluation: per expression, the Grad-CAM map of the ITM score on the text->image cross-attention of fusion layer
task.gradcam_layer (models/tasks/grounding.py), put back on the original image, ranks the dets.json proposals
(heat sum / area ** task.box_alpha); hit = IoU >= 0.5 with the referred object's box (train/grounding_eval.py).
Metrics: `<split>_acc` per task.splits (val_acc, testA_acc, testB_acc), `grounding_acc` (their mean); task.best_metric
(default val_acc) keeps checkpoints/best.

task.gradcam_layer indexes our fusion stack (0-based; negative from the end; default -1, the last layer). The
recipes' block_num = 8 counts the layers of a 12-layer BERT: in ALBEF its layers 6-11 are the fusion, so block 8 is
fusion layer 2 of 6; in SIMLA every one of the 12 layers has cross-attention, so block 8 is 8/12 of the way up,
fusion layer 4 of our 6 (refcoco_grounding.yaml follows SIMLA: 4).
--visualize N (= task.visualize=N): also write PNGs of the first N evaluated items (heat map, true box, chosen
proposal) to OUTPUT_DIR/grounding_vis/ at every evaluation.
Data layout (ALBEF's refcoco+_{train,val,test}.json, dets.json, and a refs JSON converted from the refer toolkit):
datasets/grounding.py. Exit codes, resume, stop signals and the run directory are pretraining's (train/pretrain.py).
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

VIS_DIR = "grounding_vis"


@dataclass
class GroundingSource:
    annotations: list[str]                # ALBEF refcoco+_train.json / refcoco+_val.json + refcoco+_test.json
    image_root: str                       # the directory the entries' "image" paths are relative to

    def check(self, where: str) -> None:
        if not self.annotations:
            raise ValueError(f"{where}.annotations: lists no file")
        for i, path in enumerate(self.annotations):
            if not os.path.isfile(path):
                raise ValueError(f"{where}.annotations[{i}]: no such file {path!r}")
        if not os.path.isdir(self.image_root):
            raise ValueError(f"{where}.image_root: no such directory {self.image_root!r}")


@dataclass
class GroundingTask(finetune.TaskSection):
    train: Optional[GroundingSource] = None
    eval: Optional[GroundingSource] = None
    refs: Optional[str] = None            # {ref_id: {image_id, bbox [x, y, w, h], split}} (datasets/grounding.py)
    dets: Optional[str] = None            # ALBEF's dets.json {image_id: [[x, y, w, h], ...]}
    splits: list[str] = field(default_factory=lambda: ["val", "testA", "testB"])
    gradcam_layer: int = -1               # fusion layer of the Grad-CAM (module docstring for the recipes' block 8)
    box_alpha: float = 0.5                # proposal score = heat sum / area ** alpha (ALBEF 0.5; 1 = mean heat)
    eval_resize: Literal["square", "crop"] = "square"   # eval geometry: ALBEF's S x S resize, or resize + centre crop
    visualize: int = 0                    # PNGs of the first N items in OUTPUT_DIR/grounding_vis/ per evaluation
    best_metric: str = "val_acc"

    def validate(self) -> None:
        if self.eval is None:
            raise ValueError("task.eval: missing (the evaluation expressions: annotations, image_root)")
        if self.train is None and not self.eval_only:
            raise ValueError("task.train: missing (or run with --eval_only)")
        for key in ("refs", "dets"):
            if not getattr(self, key):
                raise ValueError(f"task.{key}: missing (datasets/grounding.py describes the file)")
        if not self.splits or any(not isinstance(s, str) or not s for s in self.splits) \
                or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"task.splits must be distinct non-empty split names, got {self.splits!r}")
        if isinstance(self.gradcam_layer, bool) or not isinstance(self.gradcam_layer, int):
            raise ValueError(f"task.gradcam_layer must be an integer, got {self.gradcam_layer!r}")
        if isinstance(self.box_alpha, bool) or not isinstance(self.box_alpha, (int, float)) or not self.box_alpha >= 0:
            raise ValueError(f"task.box_alpha must be a number >= 0, got {self.box_alpha!r}")
        if isinstance(self.visualize, bool) or not isinstance(self.visualize, int) or self.visualize < 0:
            raise ValueError(f"task.visualize must be an integer >= 0, got {self.visualize!r}")
        keys = [f"{s}_acc" for s in self.splits] + ["grounding_acc"]
        if self.best_metric not in keys:
            raise ValueError(f"task.best_metric {self.best_metric!r} is not an output of these splits "
                             f"({', '.join(keys)})")

    def check_files(self) -> None:
        if self.train is not None and not self.eval_only:
            self.train.check("task.train")
        self.eval.check("task.eval")
        for key in ("refs", "dets"):
            if not os.path.isfile(getattr(self, key)):
                raise ValueError(f"task.{key}: no such file {getattr(self, key)!r}")


def _read(what: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def read_eval_items(task) -> tuple[list, dict]:
    from datasets.grounding import read_dets, read_grounding_eval, read_refs

    refs = _read("task.refs", read_refs, task.refs)
    dets, bad = _read("task.dets", read_dets, task.dets)
    items, skipped = _read("task.eval", read_grounding_eval, task.eval.annotations, task.eval.image_root, refs, dets,
                           task.splits)
    skipped = {**skipped, **({"bad_proposal": bad["bad_proposal"]} if bad else {})}
    if not items:
        raise ConfigError(f"task.eval: no usable expression of splits {task.splits} in {task.eval.annotations} "
                          f"(skipped: {skipped})")
    if skipped and os.environ.get("RANK", "0") == "0":
        print(f"task.eval: {len(items)} expressions; skipped {skipped}", flush=True)
    return items, skipped


def read_train(task):
    from datasets.grounding import read_grounding_train

    rset = _read("task.train", read_grounding_train, task.train.annotations, task.train.image_root)
    if not rset.texts:
        raise ConfigError(f"task.train: no usable expression in {task.train.annotations} (skipped: {rset.skipped})")
    if rset.skipped and os.environ.get("RANK", "0") == "0":
        print(f"task.train: {len(rset.media)} images, {len(rset.texts)} expressions; skipped {rset.skipped}",
              flush=True)
    return rset


def build(cfg, dist) -> launch.Built:
    from datasets.grounding import GroundingEvalSet
    from datasets.task_loader import TaskLoader, eval_batches
    from datasets.task_sets import RetrievalPairs
    from models.backbone import fusion_depth
    from models.tasks.grounding import check_layer
    from models.text import load_tokenizer
    from models.vlp import build_model
    from train.engine import seed_all
    from train.grounding_eval import evaluate_grounding, write_visualizations

    task, t = cfg.task, cfg.train
    if "itm" not in cfg.objectives and "itm" not in (cfg.model.heads or []):
        raise ConfigError("objectives: grounding scores with the ITM head (Grad-CAM of the ITM score): enable "
                          "objectives.itm (ALBEF / SIMLA fine-tune ITC + ITM)")
    try:
        check_layer(task.gradcam_layer, fusion_depth(cfg.model))
    except ValueError as e:
        raise ConfigError(f"task.gradcam_layer: {e}") from None
    items, eval_skipped = read_eval_items(task)
    tokenizer = load_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.objectives, tokenizer)
    finetune.load_init(model, task.init, new_prefixes=("objectives.",))
    seed_all(t.seed + dist.rank)
    loader = None
    if not task.eval_only:
        pairs = RetrievalPairs(read_train(task), cfg.data, tokenizer)
        loader = TaskLoader(pairs, cfg.data, batch_size=t.micro_batch_size, rank=dist.rank,
                            world_size=dist.world_size, seed=t.seed, name="task.train")
    data = GroundingEvalSet(items, cfg.data, tokenizer, task.eval_resize)

    def evaluate(engine) -> dict:
        skipped = Counter()
        batches = eval_batches(data, t.eval_batch_size, num_workers=cfg.data.num_workers, rank=dist.rank,
                               world_size=dist.world_size, shard=True, skipped=skipped)
        ev = evaluate_grounding(engine.module, batches, engine.to_device, items, task.splits,
                                layer=task.gradcam_layer, alpha=task.box_alpha, mode=task.eval_resize,
                                world_size=dist.world_size, keep_maps=task.visualize)
        if ev.maps and dist.is_main:
            write_visualizations(items, ev, task.eval_resize, os.path.join(t.output_dir, VIS_DIR),
                                 log=lambda m: print(m, flush=True))
        # expressions left out by the reader or unreadable now (bad_proposal counts dets.json rows, not expressions)
        junk = sum(n for r, n in eval_skipped.items() if r != "bad_proposal") + sum(skipped.values())
        return {**ev.metrics, "eval_skipped": junk}

    return finetune.built(cfg, dist, model, loader, evaluate)


ENTRY = finetune.entry("train/finetune_grounding.py", __doc__, GroundingTask, build,
                       flags=(("--visualize", "task.visualize", "write PNGs of the first N evaluated items' heat maps "
                               "and boxes to OUTPUT_DIR/grounding_vis/"),))


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
