"""Image / clip transforms with explicit randomness: every random choice comes from a `random.Random` the
caller seeds, so a sample's augmentation depends only on (seed, rank, worker, epoch, position), which is what
makes exact resume possible without replaying decodes."""
from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class TooLarge(ValueError):
    """An image or video frame with more pixels than the configured cap (`data.max_image_pixels`), found from the
    header before its pixels are decoded."""


def check_pixels(width: int, height: int, cap: int | None) -> None:
    if cap is not None and width * height > cap:
        raise TooLarge(f"{width}x{height} = {width * height} pixels > max_image_pixels {cap}")


def random_resized_crop_box(h: int, w: int, scale: tuple, rng: random.Random,
                            ratio: tuple = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) with torchvision RandomResizedCrop semantics, drawn from `rng`."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    # fallback: central crop clamped to the ratio range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h: int, w: int) -> tuple[int, int, int, int]:
    """Resize(shorter side) + CenterCrop(square) == resizing the central square crop."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def normalize_pixels(x: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> normalised `dtype`, on x's device. The loaders hand out uint8 (4x less to pass
    between processes than float32, and this costs nothing on a GPU); the engine calls this after the copy."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {x.dtype}")
    if kind not in MEAN_STD:
        raise ValueError(f"unknown normalisation {kind!r}; one of {sorted(MEAN_STD)}")
    mean, std = (torch.tensor(v, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255 for v in MEAN_STD[kind])
    return ((x.float() - mean) / std).to(dtype)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, S, S), antialiased. torch's uint8 kernels (channels-last, AVX2) are ~2x
    faster than PIL's bicubic and skip the float round trip."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode=mode,
                         align_corners=False, antialias=True)


class ImageTransform:
    """bytes -> (1, 3, S, S) uint8 (normalised later by `normalize_pixels`). train: random resized crop (+ optional
    hflip, + optional RandAugment); eval: centre. A JPEG much larger than the crop is decoded at 1/2..1/8 scale
    (PIL draft: DCT scaling, far cheaper than a full decode + resize). An image that would still decode to more
    than `max_pixels` pixels raises TooLarge before any pixel is decoded (Image.open reads the header only).

    With `tokenizer_view` (a datasets.config.TokenizerViewConfig; train only) it returns (view, tokenizer view):
    the second a uint8 (3, s, s) crop of the same decoded pixels, for a dVAE's MIM targets. Its random draws come
    after all of the encoder view's, so the encoder view is the same with or without it."""

    def __init__(self, size: int, crop_scale, hflip: bool, normalize: str, train: bool, randaugment=None,
                 max_pixels: int | None = None, tokenizer_view=None):
        if tokenizer_view is not None and not train:
            raise ValueError("a tokenizer view is a train-time view; eval transforms do not make one")
        self.size, self.crop_scale, self.hflip, self.train = size, tuple(crop_scale), hflip, train
        self.normalize = normalize  # carried into the batch, applied on the device
        self.randaug = _randaugment(randaugment) if train else None
        self.max_pixels = max_pixels
        self.tokenizer_view = tokenizer_view

    def __call__(self, data: bytes, rng: random.Random | None):
        try:
            with warnings.catch_warnings():  # PIL warns above its own limit; our cap below decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # over twice PIL's own limit: PIL refuses to open it at all
            raise TooLarge(str(e)) from None
        with im:
            w, h = im.size
            if self.train:
                box = random_resized_crop_box(h, w, self.crop_scale, rng)
                flip = self.hflip and rng.random() < 0.5
            else:
                box, flip = center_crop_box(h, w), False
            # (size, box, flip, RandAugment seed) per view, every draw made before decoding
            views = [(self.size, box, flip, rng.getrandbits(63) if self.randaug is not None else None)]
            tv = self.tokenizer_view
            if tv is not None:
                if tv.crop == "independent":
                    box = random_resized_crop_box(h, w, self.crop_scale, rng)
                    flip = self.hflip and rng.random() < 0.5
                seed = rng.getrandbits(63) if tv.randaugment and self.randaug is not None else None
                views.append((tv.size, box, flip, seed))
            if im.format in ("JPEG", "MPO") and min(views[0][1][2:]) >= 2 * self.size:
                # the decoded image stays >= the size the most demanding view requests, so each crop keeps at least
                # its S x S pixels (a tokenizer view that needs more only lowers the reduction)
                im.draft("RGB", (max(math.ceil(w * s / b[3]) for s, b, _, _ in views),
                                 max(math.ceil(h * s / b[2]) for s, b, _, _ in views)))
                views = [(s, _scale_box(b, w, h, *im.size), f, r) for s, b, f, r in views]
            check_pixels(*im.size, self.max_pixels)  # after draft: what convert() below would really decode
            im = im.convert("RGB")  # also forces the full decode, so truncated files fail here
            # a writable buffer (np.asarray of a PIL image is read-only, which torch warns about)
            a = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
        out = [self._view(a, *v) for v in views]
        return out[0] if tv is None else (out[0], out[1][0])

    def _view(self, a: torch.Tensor, size: int, box, flip: bool, seed: int | None) -> torch.Tensor:
        top, left, ch, cw = box
        x = _resize(a[top:top + ch, left:left + cw].permute(2, 0, 1)[None], size, "bicubic")
        if flip:
            x = x.flip(-1)
        if seed is not None:
            x = _apply_seeded(self.randaug, x[0].contiguous(), seed)[None]
        return x.contiguous()


def _scale_box(box, w: int, h: int, dw: int, dh: int) -> tuple[int, int, int, int]:
    """A (top, left, height, width) box of a w x h image in the coordinates of its dw x dh draft decode."""
    top, left, ch, cw = box
    sx, sy = dw / w, dh / h
    top, left = int(top * sy), int(left * sx)
    return top, left, max(1, min(round(ch * sy), dh - top)), max(1, min(round(cw * sx), dw - left))


def _randaugment(cfg):
    if cfg is None:
        return None
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=cfg.num_ops, magnitude=cfg.magnitude)


def _apply_seeded(tf, x: torch.Tensor, seed: int) -> torch.Tensor:
    # torchvision draws from torch's global RNG: seed a forked copy with a seed drawn from the sample's own rng, so
    # the result depends on the sample alone and the caller's RNG stream is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf(x)


class ClipTransform:
    """(F, H, W, 3) uint8 frames -> (F, 3, S, S) uint8; one crop / flip / RandAugment draw for the whole clip
    (torchvision applies one op draw to a stack of frames), so motion is not mistaken for augmentation."""

    def __init__(self, size: int, crop_scale, hflip: bool, normalize: str, train: bool, randaugment=None):
        self.size, self.crop_scale, self.hflip, self.train = size, tuple(crop_scale), hflip, train
        self.normalize = normalize
        self.randaug = _randaugment(randaugment) if train else None

    def __call__(self, frames: np.ndarray, rng: random.Random | None) -> torch.Tensor:
        _, h, w, _ = frames.shape
        if self.train:
            top, left, ch, cw = random_resized_crop_box(h, w, self.crop_scale, rng)
            flip = self.hflip and rng.random() < 0.5
        else:
            (top, left, ch, cw), flip = center_crop_box(h, w), False
        x = _resize(torch.from_numpy(frames[:, top:top + ch, left:left + cw]).permute(0, 3, 1, 2), self.size,
                    "bilinear")
        if flip:
            x = x.flip(-1)
        if self.randaug is not None:
            x = _apply_seeded(self.randaug, x.contiguous(), rng.getrandbits(63))
        return x.contiguous()
