"""RefCOCO+ weakly supervised grounding evaluation (ALBEF / SIMLA): Grad-CAM heat map -> top proposal -> IoU.

For each (image, expression) item (datasets/grounding.py): the Grad-CAM map of the ITM score on the fusion's
text->image cross-attention (models/tasks/grounding.py itm_gradcam), a (gh, gw) grid over the model input, is put
back on the original image through the eval geometry (`heat_on_image`, bicubic as ALBEF), every dets.json proposal
is scored on it (`box_scores`: heat sum in the box / area ** alpha), the top-scoring one is the prediction (the first
one on a tie), and it is a hit when its IoU with the ground-truth box is >= 0.5 (`box_iou`, the refer toolkit's /
ALBEF's computeIoU). Accuracy per split: `<split>_acc` for each selected split (val_acc, testA_acc, testB_acc),
`grounding_acc` = their mean.

Geometry (`input_geometry`), image of width w, height h, model input S x S:
  square   the whole image resized to S x S (ALBEF's test transform): input x' = x * S / w, y' = y * S / h; the map is
           interpolated straight to (h, w), as ALBEF does.
  crop     shorter side to S, centre crop (datasets/transforms.py center_crop_box: side = min(w, h), left = (w - side)
           // 2, top = (h - side) // 2): x' = (x - left) * S / side, y' = (y - top) * S / side; the map is
           interpolated to (side, side) and placed at (top, left) on a zero (h, w) canvas: what the model never saw
           has no heat.
Items are sharded over ranks with padding (every rank runs the same forwards and backwards, as ZeRO-3 needs), and
the per-item results are combined with all_gather_object; every rank returns the same metrics.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from datasets.batch import ATTENTION_MASK, INDEX, INPUT_IDS, PIXEL_VALUES, VALID
from datasets.grounding import IMAGE_SIZE, MODES, GroundingItem
from datasets.transforms import center_crop_box
from models.tasks.grounding import box_scores, itm_gradcam
from train.distributed import gather_objects

IOU_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------ geometry
class Geometry(NamedTuple):
    """input = (image - offset) * scale, per axis; `region` = the image part the input shows (x, y, w, h)."""
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    region: tuple


def input_geometry(width: int, height: int, size: int, mode: str) -> Geometry:
    if mode == "square":
        return Geometry(size / width, size / height, 0.0, 0.0, (0, 0, width, height))
    if mode == "crop":
        top, left, side, _ = center_crop_box(height, width)
        return Geometry(size / side, size / side, float(left), float(top), (left, top, side, side))
    raise ValueError(f"eval geometry must be one of {MODES}, got {mode!r}")


def box_to_input(box: Sequence[float], width: int, height: int, size: int, mode: str) -> tuple:
    """(x, y, w, h) in original-image pixels -> the same box in model-input pixels (may reach outside [0, S))."""
    g = input_geometry(width, height, size, mode)
    x, y, w, h = box
    return ((x - g.offset_x) * g.scale_x, (y - g.offset_y) * g.scale_y, w * g.scale_x, h * g.scale_y)


def heat_on_image(cam: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """cam (gh, gw) over the model input -> (height, width) float32 heat over the original image (bicubic)."""
    cam = cam.float()[None, None]
    if mode == "square":
        return F.interpolate(cam, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    left, top, side, _ = input_geometry(width, height, 1, mode).region
    canvas = torch.zeros(height, width)
    canvas[top:top + side, left:left + side] = F.interpolate(cam, size=(side, side), mode="bicubic",
                                                             align_corners=False)[0, 0]
    return canvas


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x, y, w, h) boxes as the refer toolkit / ALBEF computeIoU: the intersection spans pixel columns
    max(x) .. min(x + w - 1) inclusive (so +1), empty unless both spans are longer than zero; union = w*h + w*h - I."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0.0
    return float(inter) / (a[2] * a[3] + b[2] * b[3] - inter)


# ------------------------------------------------------------------------------------------------ scoring
class ItemResult(NamedTuple):
    index: int          # position in the items list
    pred: int           # index of the chosen proposal
    iou: float


def score_item(item: GroundingItem, cam: torch.Tensor, width: int, height: int, mode: str,
               alpha: float) -> ItemResult:
    heat = heat_on_image(cam, width, height, mode)
    scores = box_scores(heat, item.proposals, alpha)
    k = int(torch.argmax(scores))   # the first maximum
    return ItemResult(-1, k, box_iou(item.proposals[k], item.box))


def accuracy(items: Sequence[GroundingItem], results: dict, splits: Sequence[str]) -> dict:
    """results {index: ItemResult} -> {<split>_acc, grounding_acc, grounding_items, grounding_missing}; an item
    without a result (its image failed to load) counts as a miss."""
    out = {}
    for s in splits:
        idx = [i for i, it in enumerate(items) if it.split == s]
        if idx:
            out[f"{s}_acc"] = sum(i in results and results[i].iou >= IOU_THRESHOLD for i in idx) / len(idx)
        out[f"{s}_items"] = len(idx)
    accs = [out[f"{s}_acc"] for s in splits if f"{s}_acc" in out]
    if accs:
        out["grounding_acc"] = sum(accs) / len(accs)
    out["grounding_items"] = len(items)
    out["grounding_missing"] = len(items) - len(results)
    return out





class GroundingEval(NamedTuple):
    metrics: dict       # accuracy(): <split>_acc, grounding_acc, <split>_items, grounding_items, grounding_missing
    results: dict       # {item index: ItemResult}, every rank's
    maps: dict          # {item index: cam (gh, gw)} for the items with index < keep_maps


@torch.no_grad()
def evaluate_grounding(model, batches: Iterable[dict], to_device: Callable[[dict], dict],
                       items: Sequence[GroundingItem], splits: Sequence[str], *, layer: int = -1, alpha: float = 0.5,
                       mode: str = "square", world_size: int = 1, keep_maps: int = 0) -> GroundingEval:
    """Score every item (module docstring); every rank returns the same. Batches: datasets/task_loader.eval_batches
    over a GroundingEvalSet, sharded; rows with VALID False (padding, unreadable images) run through the model (and
    its backward) but are not scored."""
    was_training = model.training
    model.eval()
    local, kept = [], []
    try:
        for batch in batches:
            b = to_device(batch)
            cams = itm_gradcam(model, b[PIXEL_VALUES], b[INPUT_IDS], b[ATTENTION_MASK], layer).cam[:, 0].cpu()
            for i, ok, cam, (w, h) in zip(batch[INDEX].tolist(), batch[VALID].tolist(), cams,
                                          batch[IMAGE_SIZE].tolist()):
                if not ok:
                    continue
                if not 0 <= i < len(items):
                    raise ValueError(f"evaluate_grounding: batch index {i} is outside the {len(items)} items")
                r = score_item(items[i], cam, w, h, mode, alpha)._replace(index=i)
                local.append(tuple(r))
                if i < keep_maps:
                    kept.append((i, cam.clone()))
    finally:
        model.train(was_training)
    results = {}
    for part in gather_objects(local, world_size):
        for r in part:
            results.setdefault(r[0], ItemResult(*r))
    maps = {}
    for part in gather_objects(kept, world_size) if keep_maps else []:
        for i, cam in part:
            maps.setdefault(i, cam)
    return GroundingEval(accuracy(items, results, splits), results, maps)


# ------------------------------------------------------------------------------------------------ pictures
def visualize(item: GroundingItem, cam: torch.Tensor, result: ItemResult, mode: str, path: str) -> None:
    """One PNG: the original image with the heat map overlaid (as train/align_bench.py draws), the ground-truth box
    (white, solid), the chosen proposal (red, dashed; green when it is a hit) and the other proposals (thin, dotted);
    title: the expression, the split, the IoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle
    from PIL import Image

    with Image.open(item.image) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    heat = heat_on_image(cam, w, h, mode).clamp_min(0)
    heat = (heat / heat.max().clamp_min(1e-12)).numpy()
    fig, ax = plt.subplots(1, 1, figsize=(4.2, 4.2 * h / w + 0.6))
    ax.imshow(img)
    ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
    for k, (x, y, bw, bh) in enumerate(item.proposals):
        if k != result.pred:
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, lw=0.6, ec="white", ls=":"))
    x, y, bw, bh = item.box
    ax.add_patch(Rectangle((x, y), bw, bh, fill=False, lw=1.8, ec="white", ls="-"))
    hit = result.iou >= IOU_THRESHOLD
    x, y, bw, bh = item.proposals[result.pred]
    ax.add_patch(Rectangle((x, y), bw, bh, fill=False, lw=1.8, ec="lime" if hit else "red", ls="--"))
    text = item.text if len(item.text) < 80 else item.text[:77] + "..."
    ax.set_title(f"{text}\n{item.split} ref {item.ref_id}: IoU {result.iou:.2f} ({'hit' if hit else 'miss'})",
                 fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_visualizations(items: Sequence[GroundingItem], ev: GroundingEval, mode: str, out_dir: str,
                         log: Optional[Callable[[str], None]] = None) -> list[str]:
    """PNGs of the items with kept maps that were scored, in out_dir (<index>_<split>_ref<ref_id>.png) -> paths."""
    paths = []
    for i in sorted(i for i in ev.maps if i in ev.results):
        cam, r = ev.maps[i], ev.results[i]
        it = items[i]
        ref = re.sub(r"[^A-Za-z0-9_-]", "_", it.ref_id)
        path = os.path.join(out_dir, f"{i:04d}_{re.sub(r'[^A-Za-z0-9_-]', '_', it.split)}_ref{ref}.png")
        visualize(it, cam, r, mode, path)
        paths.append(path)
    if log and paths:
        log(f"grounding: wrote {len(paths)} visualizations in {out_dir}")
    return paths
