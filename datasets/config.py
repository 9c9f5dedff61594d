"""Typed data config (the `data:` YAML section). Plain dataclasses with simple field types so that a strict
YAML -> dataclass converter elsewhere can build them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MODALITIES = ("image", "video")
NORMALIZE = ("clip", "imagenet")


@dataclass
class SourceConfig:
    shards: str  # brace pattern, e.g. "data/demo/train/images-{00000..00011}.tar"
    modality: Literal["image", "video"] = "image"
    weight: float = 1.0  # relative sampling weight when several train sources are mixed

    def validate(self, where: str = "source") -> None:
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError(f"{where}.shards must be a non-empty shard pattern string")
        if self.modality not in MODALITIES:
            raise ValueError(f"{where}.modality must be one of {MODALITIES}, got {self.modality!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"{where}.weight must be a positive number, got {self.weight!r}")


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

    def validate(self) -> "DataConfig":
        for name, sources in (("train", self.train), ("eval", self.eval)):
            for i, s in enumerate(sources):
                s.validate(f"data.{name}[{i}]")
            modalities = {s.modality for s in sources}
            if len(modalities) > 1:
                raise ValueError(f"data.{name} mixes modalities {sorted(modalities)}; all sources of one run "
                                 "must share one modality for now")
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
        return self
