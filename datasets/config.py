"""Typed data config (the `data:` YAML section). Plain dataclasses with simple field types so that a strict
YAML -> dataclass converter elsewhere can build them."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

MODALITIES = ("image", "video")
NORMALIZE = ("clip", "imagenet")


@dataclass
class SourceConfig:
    shards: str  # brace pattern, e.g. "data/demo/train/images-{00000..00011}.tar"
    modality: Literal["image", "video"] = "image"
    # relative sampling weight when several train sources are mixed; image and video sources may be mixed
    # (a batch is single-modality, see datasets/loader.py)
    weight: float = 1.0
    # how logs and eval results name this source (eval keys `NAME/i2t_r1`); default: from the shard path
    name: Optional[str] = None

    def display_name(self) -> str:
        """`name`, else the shard folder plus the file prefix: data/coco_val/{0..4}.tar -> coco_val,
        data/demo/val/images-{00000..00000}.tar -> val_images."""
        if self.name:
            return self.name
        first = self.shards.split("::")[0].strip().rstrip("/")
        folder = os.path.basename(os.path.dirname(first))
        prefix = os.path.basename(first).split("{")[0].split(".")[0].strip("-_")
        return "_".join(p for p in (folder, prefix) if p) or "source"

    def validate(self, where: str = "source") -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError(f"{where}.shards must be a non-empty shard pattern string")
        if self.modality not in MODALITIES:
            raise ValueError(f"{where}.modality must be one of {MODALITIES}, got {self.modality!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"{where}.weight must be a positive number, got {self.weight!r}")


@dataclass
class RandAugmentConfig:
    num_ops: int = 2
    magnitude: int = 9  # of torchvision's 31 bins (0..30)

    def validate(self, where: str = "data.randaugment") -> None:
        if not (isinstance(self.num_ops, int) and self.num_ops >= 1):
            raise ValueError(f"{where}.num_ops must be an int >= 1, got {self.num_ops!r}")
        if not (isinstance(self.magnitude, int) and 0 <= self.magnitude <= 30):
            raise ValueError(f"{where}.magnitude must be an int in [0, 30], got {self.magnitude!r}")


TOKENIZER_CROPS = ("shared", "independent")


@dataclass
class TokenizerViewConfig:
    """A second, smaller view of each train image for a dVAE tokenizer (SIMLA / BEiT masked image modelling): the
    dVAE downsamples 8x, so `size` = patch grid x 8 (256 px with 16 px patches -> 128)."""
    size: int
    # "shared": the encoder view's crop box and flip (BEiT; codes line up with the patches); "independent": its
    # own crop + flip draw (SIMLA's official code, whose two views do not match spatially)
    crop: Literal["shared", "independent"] = "shared"
    # also apply data.randaugment (its own draw) to this view, as SIMLA's official code does
    randaugment: bool = False

    def validate(self, where: str = "data.tokenizer_view") -> None:
        s = self.size
        if not (isinstance(s, int) and not isinstance(s, bool) and s >= 8 and s % 8 == 0):
            raise ValueError(f"{where}.size must be an int >= 8 and a multiple of 8 (the dVAE downsamples 8x), "
                             f"got {s!r}")
        if self.crop not in TOKENIZER_CROPS:
            raise ValueError(f"{where}.crop must be one of {TOKENIZER_CROPS}, got {self.crop!r}")
        if not isinstance(self.randaugment, bool):
            raise ValueError(f"{where}.randaugment must be a bool, got {self.randaugment!r}")


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    image_size: int = 64
    num_frames: int = 1  # frames per video clip; images are 1-frame videos whatever this says
    max_text_len: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 500
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    hflip: bool = False  # captions with "left of" become wrong when flipped, so off by default
    normalize: Literal["clip", "imagenet"] = "clip"
    # train shards drawn with replacement per worker, forever (no shard-count requirement) instead of epochs
    resampled: bool = False
    # abort when a worker's bad samples exceed this fraction, checked once it has read bad_check_min_samples
    max_bad_fraction: float = 0.1
    bad_check_min_samples: int = 1000
    # an image (or a video frame) with more pixels than this is a bad sample ("oversize_image" /
    # "oversize_video"), judged from the header before any pixel is decoded (after JPEG draft reduction), so a
    # decompression bomb costs nothing; 36 M = 6000 x 6000
    max_image_pixels: int = 36_000_000
    # train only, e.g. {num_ops: 2, magnitude: 9}; a video clip gets one draw for all its frames
    randaugment: Optional[RandAugmentConfig] = None
    mlm_probability: Optional[float] = None  # set -> train batches also carry mlm_input_ids / mlm_labels
    # set -> train batches also carry tokenizer_pixels (uint8, unnormalised) for MIM targets; image sources only
    tokenizer_view: Optional[TokenizerViewConfig] = None
    # an ALIGN-BENCH dir (images/N.jpg, pkls/N.pkl): every evaluation also scores it (train/align_bench.py)
    align_bench: Optional[str] = None

    def validate(self) -> "DataConfig":
        for name, sources in (("train", self.train), ("eval", self.eval)):
            for i, s in enumerate(sources):
                s.validate(f"data.{name}[{i}]")
                if s.name is not None and not (isinstance(s.name, str) and s.name.strip()):
                    raise ValueError(f"data.{name}[{i}].name must be a non-empty string, got {s.name!r}")
        names = [s.display_name() for s in self.eval]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.eval: several sources are named {dup[0]!r}; give each a distinct `name:`")
        if not (isinstance(self.image_size, int) and self.image_size > 0):
            raise ValueError(f"data.image_size must be a positive int, got {self.image_size!r}")
        if not (isinstance(self.num_frames, int) and self.num_frames > 0):
            raise ValueError(f"data.num_frames must be a positive int, got {self.num_frames!r}")
        if not (isinstance(self.max_text_len, int) and self.max_text_len > 1):
            raise ValueError(f"data.max_text_len must be an int > 1, got {self.max_text_len!r}")
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ValueError(f"data.num_workers must be an int >= 0, got {self.num_workers!r}")
        if not (isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0):
            raise ValueError(f"data.shuffle_buffer must be an int >= 0, got {self.shuffle_buffer!r}")
        cs = self.crop_scale
        if not (isinstance(cs, (list, tuple)) and len(cs) == 2
                and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in cs) and cs[0] <= cs[1]):
            raise ValueError(f"data.crop_scale must be two floats lo <= hi in (0, 1], got {cs!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"data.hflip must be a bool, got {self.hflip!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"data.normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not isinstance(self.resampled, bool):
            raise ValueError(f"data.resampled must be a bool, got {self.resampled!r}")
        if not (isinstance(self.max_bad_fraction, (int, float)) and 0 <= self.max_bad_fraction <= 1):
            raise ValueError(f"data.max_bad_fraction must be a number in [0, 1], got {self.max_bad_fraction!r}")
        if not (isinstance(self.bad_check_min_samples, int) and self.bad_check_min_samples >= 1):
            raise ValueError(f"data.bad_check_min_samples must be an int >= 1, got {self.bad_check_min_samples!r}")
        mp = self.max_image_pixels
        if not (isinstance(mp, int) and not isinstance(mp, bool) and mp >= 1):
            raise ValueError(f"data.max_image_pixels must be an int >= 1, got {mp!r}")
        if isinstance(self.randaugment, dict):  # built directly from a plain dict (not via the YAML loader)
            self.randaugment = RandAugmentConfig(**self.randaugment)
        if self.randaugment is not None:
            if not isinstance(self.randaugment, RandAugmentConfig):
                raise ValueError(f"data.randaugment must be null or {{num_ops, magnitude}}, got {self.randaugment!r}")
            self.randaugment.validate()
        p = self.mlm_probability
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1):
            raise ValueError(f"data.mlm_probability must be null or a number in (0, 1), got {p!r}")
        if isinstance(self.tokenizer_view, dict):  # built directly from a plain dict (not via the YAML loader)
            self.tokenizer_view = TokenizerViewConfig(**self.tokenizer_view)
        tv = self.tokenizer_view
        if tv is not None:
            if not isinstance(tv, TokenizerViewConfig):
                raise ValueError(f"data.tokenizer_view must be null or {{size, crop, randaugment}}, got {tv!r}")
            tv.validate()
            video = next((i for i, s in enumerate(self.train) if s.modality == "video"), None)
            if video is not None:
                raise ValueError(f"data.tokenizer_view: masked image modelling is image-only, but data.train[{video}] "
                                 "is a video source (drop that source or set data.tokenizer_view: null)")
            if tv.randaugment and self.randaugment is None:
                raise ValueError("data.tokenizer_view.randaugment: true needs data.randaugment to be set")
        if self.align_bench is not None and not (isinstance(self.align_bench, str) and self.align_bench.strip()):
            raise ValueError(f"data.align_bench must be null or a directory path, got {self.align_bench!r}")
        return self
