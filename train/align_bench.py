"""ALIGN-BENCH: how well the last fusion layer's text->image cross-attention lands on human-annotated regions.

    python train/align_bench.py --checkpoint RUN_OR_FILE --data DIR [--out DIR] [--visualize N] [--batch-size B]
        [--device cpu|cuda]

RUN_OR_FILE: a run dir / DeepSpeed checkpoint dir (any ZeRO stage, consolidated as convert_checkpoint.py does) or a
whole-model `kind: vlp` file (zero-to-fp32, import --format scl); the run config inside gives the model, tokenizer,
data.normalize and data.max_text_len. DIR: the released layout, DIR/images/N.jpg + DIR/pkls/N.pkl
(datasets/align_bench.py reads it; bad items are skipped and counted by reason, never a crash).

The procedure is the released align_global.py / align_local.py (methods.md §1.7) with their bugs fixed: eval mode,
unmasked inputs; the LAST fusion layer's text->image cross-attention (not the text self-attention the released
scripts read), max over heads, the frame-CLS columns dropped, the patch columns as the grid; ground truth = union of
boxes or pixel masks at the original size, resized bicubic to the grid and clamped to [0, 1];
score = sum(mask * att) / sum(att).
  global: the text-CLS row vs the union of all the item's regions except boxes covering > 90% of the image
          (background; for the pixel variant those regions' pixel masks too); mean over items (an item whose regions
          are all background has no global score: counted as `background_only`).
  local:  rows of the caption tokens (not CLS, not the final SEP/</s>, never padding); sub-word rows summed into
          words (BPE: a token starting with 'Ġ' starts a word; WordPiece: '##' continues one), '.' and ','
          skipped; each phrase = its first word-sequence match, its words' maps summed; mean over the item's
          phrases, then over items. A phrase cut off by data.max_text_len is skipped (`phrase_truncated`).
  videos: with F > 1 frames, each frame's patch grid is scored on its own and the F scores averaged.
Output keys (printed, written to OUT/align_bench.json, and merged into the pretraining eval with data.align_bench):
  align_global_box, align_global_pixel, align_local_box, align_local_pixel (None when nothing was scored),
  align_items (items scored), align_skipped ({reason: count}).
OUT defaults to <checkpoint dir or the file's folder>/align_bench. --visualize N: PNG overlays of the first N scored
items (CLS map + one panel per phrase, GT boxes drawn) in OUT/vis/. Exit 2 with one `error:` line on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

KEYS = ("align_global_box", "align_global_pixel", "align_local_box", "align_local_pixel", "align_items",
        "align_skipped")
BACKGROUND_ONLY = "background_only"


# ------------------------------------------------------------------------------------------------ the math
def mask_score(att: torch.Tensor, mask: torch.Tensor) -> float:
    """att (F, gh, gw) >= 0, mask (gh, gw) in [0, 1]: mean over frames of sum(mask * att_f) / sum(att_f)."""
    att = att.double()
    return float(((att * mask.double()).sum((-2, -1)) / att.sum((-2, -1))).mean())


def cross_attention_maps(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) normalised pixels + text -> (B, Lt, F, gh, gw) float: the last fusion layer's text->image
    cross-attention probabilities, max over heads, the frame-CLS columns dropped, the patch columns as grids."""
    image = model.encode_image(pixel_values)
    text = model.fusion_text(input_ids, attention_mask)
    out = model.fuse(text, attention_mask, image, return_attention=True)
    att = out.text_to_image_attentions[-1].float().amax(1)   # (B, Lt, Nv), Nv = F + F * P
    f = image.num_frames
    gh, gw = model.vision.grid_size
    return att[:, :, f:].unflatten(-1, (f, gh, gw))


def score_item(item, att: torch.Tensor) -> dict:
    """item: datasets.align_bench.AlignItem; att: (Lt, F, gh, gw) for it. -> per-item scores (None = not scored)."""
    rec = {"key": item.key, "global_box": None, "global_pixel": None, "local_box": None, "local_pixel": None,
           "phrases": {}}
    if item.global_box is not None:
        rec["global_box"] = mask_score(att[0], item.global_box)
        rec["global_pixel"] = mask_score(att[0], item.global_pixel)
    for p in item.phrases:
        m = att[p.tokens].sum(0)   # sub-words -> words -> phrase: sums of rows
        rec["phrases"][p.text] = (mask_score(m, p.box), mask_score(m, p.pixel))
    if rec["phrases"]:
        vals = list(rec["phrases"].values())
        rec["local_box"] = sum(v[0] for v in vals) / len(vals)
        rec["local_pixel"] = sum(v[1] for v in vals) / len(vals)
    return rec


def _mean(vals: list) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(records: list[dict], skipped: Counter) -> dict:
    skipped = Counter(skipped)
    bg = sum(r["global_box"] is None for r in records)
    if bg:
        skipped[BACKGROUND_ONLY] += bg
    return {"align_global_box": _mean([r["global_box"] for r in records]),
            "align_global_pixel": _mean([r["global_pixel"] for r in records]),
            "align_local_box": _mean([r["local_box"] for r in records]),
            "align_local_pixel": _mean([r["local_pixel"] for r in records]),
            "align_items": len(records),
            "align_skipped": dict(sorted(skipped.items()))}


# ------------------------------------------------------------------------------------------------ reading
def read_items(reader, progress: bool = False, log=None):
    """-> (items, Counter of skip reasons). Bad items never raise; `log(msg)` hears about each."""
    from datasets.align_bench import BadItem

    keys = reader.keys()
    items, skipped = [], Counter()
    it = keys
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(keys, desc="align-bench read", unit="item", dynamic_ncols=True, mininterval=1.0)
    for k in it:
        try:
            item = reader.read(k)
        except BadItem as e:
            skipped[e.reason] += 1
            if log:
                log(f"skipped {k}: {e}")
            continue
        for reason, n in item.skipped_phrases.items():
            skipped[reason] += n
        items.append(item)
    return items, skipped


def run_items(model, items: list, to_device, batch_size: int, normalize: str, progress: bool = False,
              keep_attention: int = 0) -> tuple[list[dict], list]:
    """Forward the items in batches (every rank must call this under ZeRO-3) -> (records, attention maps of the
    first `keep_attention` items, each (Lt, F, gh, gw) on the CPU)."""
    from datasets.batch import ATTENTION_MASK, INPUT_IDS, NORMALIZE, PIXEL_VALUES

    records, kept = [], []
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="align-bench", unit="batch", dynamic_ncols=True, mininterval=1.0)
    for s in starts:
        chunk = items[s:s + batch_size]
        batch = {PIXEL_VALUES: torch.stack([it.pixel_values for it in chunk]), NORMALIZE: normalize,
                 INPUT_IDS: torch.stack([it.input_ids for it in chunk]),
                 ATTENTION_MASK: torch.stack([it.attention_mask for it in chunk])}
        b = to_device(batch)
        with torch.no_grad():
            att = cross_attention_maps(model, b[PIXEL_VALUES], b[INPUT_IDS], b[ATTENTION_MASK]).cpu()
        for item, a in zip(chunk, att):
            records.append(score_item(item, a))
            if len(kept) < keep_attention:
                kept.append(a)
    return records, kept


def make_reader(root: str, tokenizer, model, data_cfg: dict):
    from datasets.align_bench import AlignBenchReader

    vision = model.vision
    return AlignBenchReader(root, tokenizer, vision.cfg.img_size, vision.grid_size,
                            int(data_cfg.get("max_text_len", 32)),
                            int(data_cfg.get("max_image_pixels", 36_000_000)))


def eval_hook(root: str, tokenizer, data_cfg, batch_size: int):
    """The pretraining evaluation's part: engine -> the six keys. Items are read once (first call) and kept; every
    rank runs the same forwards (ZeRO-3 needs all of them)."""
    cache = {}

    def run(engine) -> dict:
        model = engine.module
        if "items" not in cache:
            cache["items"], cache["skipped"] = read_items(make_reader(root, tokenizer, model, vars(data_cfg)))
        records, _ = run_items(model, cache["items"], engine.to_device, batch_size, data_cfg.normalize)
        return summarize(records, cache["skipped"])
    return run


# ------------------------------------------------------------------------------------------------ pictures
def visualize(item, att: torch.Tensor, record: dict, path: str) -> None:
    """One PNG: the image with the caption-level (CLS) map, then one panel per scored phrase (its words' summed map);
    maps upsampled to the image and overlaid, GT boxes drawn (background boxes dashed). Frame 0 for videos."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch.nn.functional as F
    from matplotlib.patches import Rectangle
    from PIL import Image

    with Image.open(item.image_path) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = item.size

    def up(m: torch.Tensor) -> np.ndarray:
        m = F.interpolate(m[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return (m / m.max().clamp_min(1e-12)).numpy()

    panels = [("[CLS] (caption)", att[0, 0], item.regions,
               record["global_box"], record["global_pixel"])]
    for p in item.phrases:
        box, pix = record["phrases"][p.text]
        panels.append((p.text, att[p.tokens, 0].sum(0), p.regions, box, pix))
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    for ax, (title, m, regions, sb, sp) in zip(axes[0], panels):
        ax.imshow(img)
        ax.imshow(up(m), cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
        for r in regions:
            x1, y1, x2, y2 = r.box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec="white",
                                   ls="--" if r.background else "-"))
        score = "" if sb is None else f"\nbox {sb:.3f} pixel {sp:.3f}"
        ax.set_title(f"{title}{score}", fontsize=8)
        ax.axis("off")
    cap = item.caption if len(item.caption) < 120 else item.caption[:117] + "..."
    fig.suptitle(f"{item.key}: {cap}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))   # leave the top tenth to the caption, clear of the panel titles
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI
class UserError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train/align_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir / DeepSpeed checkpoint dir, or a kind: vlp file")
    p.add_argument("--data", required=True, help="ALIGN-BENCH dir (images/N.jpg, pkls/N.pkl)")
    p.add_argument("--out", default=None, help="output dir (default: beside the checkpoint, align_bench/)")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="PNG overlays of the first N scored items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no per-item skip lines")
    return p


def load_model(checkpoint: str):
    """-> (model in eval mode, run config dict, tokenizer)."""
    from models.text import load_tokenizer
    from models.weights import WeightsError, check_keys
    from train import convert_checkpoint as cc

    if not os.path.exists(checkpoint):
        raise UserError(f"--checkpoint: no such file or directory {checkpoint!r}")
    try:
        sd, meta = cc.load_input(checkpoint)
    except cc.UserError as e:
        raise UserError(str(e)) from None
    if meta.get("kind") != "vlp" or not isinstance(meta.get("config"), dict):
        raise UserError(f"{checkpoint}: not a whole-model checkpoint (kind={meta.get('kind')!r}); give a run dir or "
                        "a file from `convert_checkpoint.py zero-to-fp32|import --format scl`")
    config = meta["config"]
    model = cc.build_from_config(config)
    check_keys(sd, model.state_dict(), f"{checkpoint} vs the model its config builds")
    model.load_state_dict(sd, strict=True)
    model.eval()
    try:
        tokenizer = load_tokenizer(model.cfg.text)
    except Exception as e:
        raise WeightsError(f"cannot load the run's tokenizer: {type(e).__name__}: {e}") from None
    return model, config, tokenizer


def default_out(checkpoint: str) -> str:
    base = checkpoint.rstrip("/") if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(base, "align_bench")


def cli(args) -> dict:
    from datasets.align_bench import check_dir
    from datasets.batch import to_device

    if args.visualize < 0 or args.batch_size < 1:
        raise UserError("--visualize must be >= 0 and --batch-size >= 1")
    why = check_dir(args.data)
    if why:
        raise UserError(f"--data: {why}")
    out = args.out or default_out(args.checkpoint)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out: {out!r} exists and is not a directory")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, tokenizer = load_model(args.checkpoint)
    model.to(device)
    data_cfg = config.get("data") or {}
    reader = make_reader(args.data, tokenizer, model, data_cfg)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr))
    items, skipped = read_items(reader, progress=not args.quiet, log=log)
    records, atts = run_items(model, items, lambda b: to_device(b, device, torch.float32), args.batch_size,
                              data_cfg.get("normalize", "clip"), progress=not args.quiet,
                              keep_attention=args.visualize)
    result = summarize(records, skipped)
    os.makedirs(out, exist_ok=True)
    for item, att, rec in zip(items, atts, records):
        visualize(item, att, rec, os.path.join(out, "vis", f"{item.key}.png"))
    full = {**result, "checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
            "items": records}
    path = os.path.join(out, "align_bench.json")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(full, f, indent=1)
    os.replace(tmp, path)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"items scored {result['align_items']}, skipped {result['align_skipped'] or 'none'}")
    print(f"global  box {fmt(result['align_global_box'])}  pixel {fmt(result['align_global_pixel'])}")
    print(f"local   box {fmt(result['align_local_box'])}  pixel {fmt(result['align_local_pixel'])}")
    print(f"wrote {path}" + (f" and {min(args.visualize, len(items))} PNGs in {os.path.join(out, 'vis')}"
                              if args.visualize else ""))
    return result


def main(argv=None) -> int:
    from models.weights import WeightsError
    from train.config import ConfigError

    try:
        cli(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    except (UserError, WeightsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
