import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.backbone import ContrastiveHeadConfig  # noqa: E402
from models.fusion import FusionConfig  # noqa: E402
from models.objectives.glscl import MgscConfig, MltcConfig  # noqa: E402
from models.objectives.itc import ItcConfig  # noqa: E402
from models.objectives.itm import ItmConfig  # noqa: E402
from models.objectives.mlm import MlmConfig  # noqa: E402
from models.text import TextConfig, load_tokenizer  # noqa: E402
from models.vision import VisionConfig  # noqa: E402
from models.vlp import ModelConfig, build_model  # noqa: E402


def tiny_config(pretrained_text: bool = False) -> ModelConfig:
    text = (TextConfig(pretrained="minilm") if pretrained_text else
            TextConfig(tokenizer="minilm", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128))
    return ModelConfig(
        VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
        text, FusionConfig(hidden_size=64, num_layers=2, num_heads=4), ContrastiveHeadConfig(embed_dim=32))


def all_objectives():
    return {"itc": ItcConfig(), "itm": ItmConfig(), "mlm": MlmConfig()}


def glscl_objectives():
    """All five pretraining objectives of GLSCL (ITC, ITM, MLM, MGSC, MLTC)."""
    return {**all_objectives(), "mgsc": MgscConfig(), "mltc": MltcConfig()}


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TextConfig(tokenizer="minilm"))


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_model(tiny_config(), all_objectives(), tokenizer)


def make_batch(tokenizer, b=4, frames=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a small red circle left of a large blue square", "a large green triangle", "a blue square",
                "a small yellow circle above a red triangle", "a purple square moving right", "an orange circle"]
    enc = tokenizer(captions[:b], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {"pixel_values": torch.randn(b, frames, 3, size, size, generator=g),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture
def batch(tokenizer):
    return lambda **kw: make_batch(tokenizer, **kw)


@pytest.fixture
def model_factory(tokenizer):
    def build(pretrained_text=False, objectives=None, seed=0):
        torch.manual_seed(seed)
        return build_model(tiny_config(pretrained_text), objectives or all_objectives(), tokenizer)
    return build
