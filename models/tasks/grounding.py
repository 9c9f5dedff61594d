"""Weakly supervised grounding (ALBEF / SIMLA RefCOCO+): Grad-CAM of the ITM score on the fusion's text->image
cross-attention, and the proposal score on the resulting heat map. The model is the pretraining one (ITC + ITM
fine-tuned on image-expression pairs); nothing here trains.

Grad-CAM (`itm_gradcam`), for each (image, expression) pair, with A = the text->image cross-attention probabilities
of fusion layer `layer` (B, heads, Lt, Nv; Nv = F frame-CLS columns, then F x P patch columns) and s = the ITM head's
positive logit on the fusion's pooled features:
    G = d(sum over the batch of s) / dA             (torch.autograd.grad on A; no parameter .grad is touched)
    cam = relu(G) * A                               (ALBEF: grads.clamp(min=0) * cams)
    keep the patch columns (the F frame-CLS columns dropped), mean over heads, then the mean over the expression's
    real tokens (attention_mask 1: CLS and SEP included, as ALBEF's mask is the attention mask; padding excluded),
    reshaped to (F, gh, gw).
The rows of a batch do not interact (eval mode), so the gradient of the sum is each pair's own.
Differences from ALBEF's Grounding.py: ALBEF divides the token sum by the padded length of the batch (`.mean(1)`
over padding zeros), we by the expression's own token count (a per-pair factor: the ranking of its proposals is the
same); ALBEF drops its one CLS column, we the F frame-CLS columns (F = 1 for images); ALBEF reads
`encoder.layer[block_num]` of its 12-layer BERT whose layers 6-11 are the fusion, block_num 8 = its third fusion
layer; here `layer` indexes our fusion stack directly (default -1: the last; see train/finetune_grounding.py for
the SIMLA / ALBEF mapping). Only the layer's text CLS row reaches the ITM score at the last layer (the other text
rows of the last layer feed nothing), so a last-layer map is the CLS row's, divided by the token count.

Proposal score (`box_scores`): the heat map in original-image pixels (train/grounding_eval.py puts it there);
score = sum of the heat over the box's pixel rows int(y):int(y + h), columns int(x):int(x + w) (ALBEF's slicing;
clipped to the image here) / (w * h) ** alpha with the box's own w, h. ALBEF's Grounding.py passes alpha = 0.5;
alpha = 1 is the mean heat in the box.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class GradCam(NamedTuple):
    cam: torch.Tensor        # (B, F, gh, gw) float32, >= 0
    itm_score: torch.Tensor  # (B,) the ITM positive logit (detached)


def check_layer(layer: int, num_layers: int) -> int:
    """`layer` (negative counts from the end) -> its index in the fusion stack; ValueError if out of range."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"Grad-CAM layer {layer!r} is not a fusion layer (the fusion has {num_layers}: 0 .. "
                         f"{num_layers - 1}, or -1 .. -{num_layers} from the end)")
    return layer % num_layers


def itm_gradcam(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layer: int = -1) -> GradCam:
    """Grad-CAM maps of the ITM score on fusion layer `layer` (module docstring). model: a VLP backbone with the
    ITM head, in eval mode; pixel_values (B, F, 3, H, W) normalised. Works under an outer torch.no_grad(): the
    unimodal towers run without a graph, the fusion with one, from detached leaves (the backward stops there)."""
    if "itm" not in getattr(model, "heads", ()):
        raise ValueError("Grad-CAM grounding scores with the ITM head; this model has none")
    idx = check_layer(layer, len(model.fusion_layers))
    with torch.no_grad():
        image = model.encode_image(pixel_values)
        text = model.fusion_text(input_ids, attention_mask)
    # The probabilities are taken by a forward hook placed ahead of any other on the layer's text->image attention
    # module: under ZeRO-3, DeepSpeed's own forward hook hands the caller stand-ins for a module's outputs (identity
    # nodes for its backward-time parameter gathering), and the stand-in for the probabilities returned in
    # FusionOutput.text_to_image_attentions is not on the path to the score; the module's own tensor is.
    seen = []
    handle = model.text_to_image_attention(idx).register_forward_hook(
        lambda module, args, output: seen.append(output[1]), prepend=True)
    try:
        with torch.enable_grad():
            image = image._replace(tokens=image.tokens.detach().requires_grad_(True))
            text = text.detach().requires_grad_(True)
            out = model.fuse(text, attention_mask, image, return_attention=True)
            score = model.itm_head(out.cls_feats)[:, 1]
            att = seen[-1]                                              # (B, heads, Lt, Nv)
            (grad,) = torch.autograd.grad(score.sum(), att)
    finally:
        handle.remove()
    f = image.num_frames
    cam = (grad.float().clamp(min=0) * att.detach().float())[..., f:]   # patch columns only
    cam = cam.mean(1)                                                     # heads -> (B, Lt, F*P)
    m = attention_mask.to(cam.dtype)[:, :, None]
    cam = (cam * m).sum(1) / m.sum(1).clamp_min(1)                        # real tokens -> (B, F*P)
    gh, gw = model.vision.grid_size
    return GradCam(cam.unflatten(-1, (f, gh, gw)), score.detach())


def box_scores(heat: torch.Tensor, boxes: Sequence, alpha: float = 0.5) -> torch.Tensor:
    """heat (H, W) on the original image; boxes [(x, y, w, h), ...] in its pixels -> (N,) float64 scores
    sum(heat[int(y):int(y+h), int(x):int(x+w)]) / (w*h) ** alpha (module docstring), the slice clipped to the
    image (a box outside it scores 0)."""
    hh, ww = heat.shape
    heat = heat.double()
    out = torch.zeros(len(boxes), dtype=torch.float64)
    for k, (x, y, w, h) in enumerate(boxes):
        x0, y0 = min(max(int(x), 0), ww), min(max(int(y), 0), hh)
        x1, y1 = min(max(int(x + w), 0), ww), min(max(int(y + h), 0), hh)
        out[k] = heat[y0:y1, x0:x1].sum() / (float(w) * float(h)) ** alpha
    return out
