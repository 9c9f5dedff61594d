"""The DALL·E discrete VAE encoder: a frozen image tokenizer whose codes are SIMLA's masked-image-modelling targets.

Same architecture and state-dict keys as OpenAI's `dall_e` encoder, so its released weights (imported once by
`train/convert_checkpoint.py import --format dalle-dvae`) load strictly:
  blocks.input                 7x7 conv, in_channels -> hidden
  blocks.group_{1..4}          blocks_per_group residual blocks each, widths 1, 2, 4, 8 x hidden; groups 1-3 end
                               in a 2x2 max-pool (8x down: a 128² view -> a 16x16 code grid)
    .block_{j}.id_path         1x1 conv, only where the width changes (else identity, no keys)
    .block_{j}.res_path        relu, 3x3 conv (-> width/4), relu, 3x3, relu, 3x3, relu, 1x1 conv (-> width)
  blocks.output                relu, 1x1 conv to the vocabulary (logits)
Every conv stores `w` (out, in, k, k) and `b` (out,), padding (k-1)//2; a block adds its residual scaled by
1 / (4 * blocks_per_group)².
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1  # dall_e's pixel margin: the dVAE was trained on pixels squeezed into [0.1, 0.9]
GROUPS = 4


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the dVAE's input range [eps, 1 - eps]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class _Conv(nn.Module):
    """A conv with dall_e's parameter names (`w`, `b`); always computed in float32 (see DVAEEncoder.codes)."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # dall_e's init: fan-in scaled normal weights, zero bias
        n_in = self.w.shape[1]
        with torch.no_grad():
            self.w.normal_(std=1 / math.sqrt(n_in * self.kw ** 2), generator=generator)
            self.b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .float() also keeps a module that someone cast to bf16 computing in fp32
        return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv(n_hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """Pixels -> logits over `vocab_size` codes on a grid 8x smaller per side. Use `codes` for targets."""

    def __init__(self, hidden: int = 256, blocks_per_group: int = 2, vocab_size: int = 8192, in_channels: int = 3):
        super().__init__()
        if hidden % 4 or hidden < 4 or blocks_per_group < 1 or vocab_size < 2 or in_channels < 1:
            raise ValueError(f"bad dVAE sizes: hidden={hidden} (a multiple of 4), blocks_per_group={blocks_per_group}, "
                             f"vocab_size={vocab_size}, in_channels={in_channels}")
        self.hidden, self.blocks_per_group, self.vocab_size, self.in_channels = (hidden, blocks_per_group,
                                                                                 vocab_size, in_channels)
        n_layers = GROUPS * blocks_per_group
        groups: list[tuple[str, nn.Module]] = [("input", _Conv(in_channels, hidden, 7))]
        width = hidden
        for g in range(GROUPS):
            out = hidden * 2 ** g
            layers: list[tuple[str, nn.Module]] = []
            for j in range(blocks_per_group):
                layers.append((f"block_{j + 1}", _Block(width, out, n_layers)))
                width = out
            if g < GROUPS - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                            ("conv", _Conv(width, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def sizes(self) -> dict:
        return {"hidden": self.hidden, "blocks_per_group": self.blocks_per_group, "vocab_size": self.vocab_size,
                "in_channels": self.in_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """map_pixels(pixels) (B, C, H, W) -> logits (B, vocab, H/8, W/8), float32."""
        return self.blocks(x)

    def codes(self, pixels_0_1: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (B, C, H, W), H and W multiples of 8 -> code ids (B, H/8 * W/8), long, row-major.

        A frozen target generator: no gradients, and float32 whatever autocast is active (bf16 logits would flip
        near-tied argmaxes, so targets would depend on the precision of the run)."""
        if pixels_0_1.dim() != 4 or pixels_0_1.shape[1] != self.in_channels:
            raise ValueError(f"expected pixels (B, {self.in_channels}, H, W), got {tuple(pixels_0_1.shape)}")
        if pixels_0_1.shape[-2] % 8 or pixels_0_1.shape[-1] % 8:
            raise ValueError(f"image size {tuple(pixels_0_1.shape[-2:])} is not a multiple of 8 (the dVAE's stride)")
        with torch.no_grad(), torch.autocast(pixels_0_1.device.type, enabled=False):
            logits = self(map_pixels(pixels_0_1.float()))
        return logits.argmax(dim=1).flatten(1)


def load_dvae(path: str) -> DVAEEncoder:
    """A safetensors file written by `convert_checkpoint.py import --format dalle-dvae` -> a frozen DVAEEncoder."""
    from models.weights import WeightsError, load_strict, load_weights

    sd, meta = load_weights(path)
    if meta.get("kind") != "dvae":
        raise WeightsError(f"{path}: kind is {meta.get('kind')!r}, not a dVAE tokenizer (write one with "
                           "train/convert_checkpoint.py import --format dalle-dvae)")
    try:
        sizes = {k: int(json.loads(meta[k])) for k in ("hidden", "blocks_per_group", "vocab_size")}
        sizes["in_channels"] = int(json.loads(meta.get("in_channels", "3")))
        model = DVAEEncoder(**sizes)
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: bad dVAE size metadata ({type(e).__name__}: {e})") from None
    load_strict(model, sd, f"{path}: dVAE weights")
    return _freeze(model)


def small_random_dvae(vocab_size: int, hidden: int = 16, blocks_per_group: int = 1, seed: int = 0) -> DVAEEncoder:
    """A small RANDOMLY INITIALISED tokenizer with DVAEEncoder's interface, for tests and the CPU demo. Its codes are
    a fixed function of the pixels: a learnable but meaningless target, not DALL·E's.

    dall_e's init (seeded), with every filter centred to zero mean: with the raw init the image's mean brightness
    dominates and nearly every position gets the same code; centred, the codes follow local structure and spread
    over the vocabulary."""
    model = DVAEEncoder(hidden=hidden, blocks_per_group=blocks_per_group, vocab_size=vocab_size)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _Conv):
            m.reset_parameters(g)
            with torch.no_grad():
                m.w -= m.w.mean(dim=(1, 2, 3), keepdim=True)
    return _freeze(model)


def _freeze(model: DVAEEncoder) -> DVAEEncoder:
    model.eval()
    model.requires_grad_(False)
    return model
