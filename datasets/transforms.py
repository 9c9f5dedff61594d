"""Image / clip transforms with explicit randomness: every random choice comes from a `random.Random` the
caller seeds, so a sample's augmentation depends only on (seed, rank, worker, epoch, position), which is what
makes exact resume possible without replaying decodes."""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


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


class Normalize:
    def __init__(self, kind: str):
        mean, std = MEAN_STD[kind]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., 3, H, W) float in [0, 1]
        return (x - self.mean) / self.std


class ImageTransform:
    """bytes -> (1, 3, S, S) normalised float. train: random resized crop (+ optional hflip, + optional
    RandAugment); eval: centre. Work stays in uint8 until the final normalise, and a JPEG much larger than the
    crop is decoded at 1/2..1/8 scale (PIL draft: DCT scaling, far cheaper than a full decode + resize)."""

    def __init__(self, size: int, crop_scale, hflip: bool, normalize: str, train: bool, randaugment=None):
        self.size, self.scale, self.hflip, self.train = size, tuple(crop_scale), hflip, train
        mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[normalize])
        self.scale, self.shift = 1 / (255 * std), -mean / std  # (x/255 - mean)/std as x*scale + shift
        self.randaug = None
        if randaugment is not None and train:
            from torchvision.transforms import v2

            self.randaug = v2.RandAugment(num_ops=randaugment.num_ops, magnitude=randaugment.magnitude)

    def __call__(self, data: bytes, rng: random.Random | None) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if self.train:
                top, left, ch, cw = random_resized_crop_box(h, w, self.scale, rng)
                flip = self.hflip and rng.random() < 0.5
            else:
                (top, left, ch, cw), flip = center_crop_box(h, w), False
            sx = sy = 1.0
            if im.format in ("JPEG", "MPO") and min(ch, cw) >= 2 * self.size:
                # the decoded image stays >= the requested size, so the crop keeps at least S x S pixels
                im.draft("RGB", (math.ceil(w * self.size / cw), math.ceil(h * self.size / ch)))
                sx, sy = im.size[0] / w, im.size[1] / h
            im = im.convert("RGB")  # also forces the full decode, so truncated files fail here
        im = im.resize((self.size, self.size), Image.BICUBIC,
                       box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(im)  # uint8 (S, S, 3)
        if self.randaug is not None:
            # torchvision draws from torch's global RNG: seed a forked copy from the sample's own rng, so the
            # result depends on the sample alone and the caller's RNG stream is left untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                a = self.randaug(torch.from_numpy(a.copy()).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        # one fused multiply-add in numpy: small torch ops per sample cost more in dispatch/threading than work
        x = a.astype(np.float32) * self.scale + self.shift
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).unsqueeze(0)


class ClipTransform:
    """(F, H, W, 3) uint8 frames -> (F, 3, S, S); one crop / flip decision for the whole clip."""

    def __init__(self, size: int, crop_scale, hflip: bool, normalize: str, train: bool):
        self.size, self.scale, self.hflip, self.train = size, tuple(crop_scale), hflip, train
        self.norm = Normalize(normalize)

    def __call__(self, frames: np.ndarray, rng: random.Random | None) -> torch.Tensor:
        _, h, w, _ = frames.shape
        if self.train:
            top, left, ch, cw = random_resized_crop_box(h, w, self.scale, rng)
            flip = self.hflip and rng.random() < 0.5
        else:
            (top, left, ch, cw), flip = center_crop_box(h, w), False
        x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + ch, left:left + cw]))
        x = x.permute(0, 3, 1, 2).float().div_(255)
        if (ch, cw) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0, 1)
        if flip:
            x = x.flip(-1)
        return self.norm(x)
