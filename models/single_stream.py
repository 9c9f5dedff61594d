"""SIMLA's single-stream encoder: ONE BERT whose every layer is self-attention -> optional cross-attention -> FFN.

The same weights serve three passes (methods.md §2.1, §2.2):
  text        cross-attention skipped: the unimodal text encoder (ITC/ITA)
  multimodal  every layer also attends to the image tokens: the fusion encoder (ITM, MLM, PSL's keyword votes)
  query       the image tokens are the queries (`embed_inputs`: BERT position embeddings + LayerNorm applied to them)
              and cross-attend to the caption's non-contextualised embeddings (image-side MIM)
Plain PyTorch on SDPA (transformers 5 has BERT cross-attention only in causal decoder mode). Key names follow
transformers' BERT (`embeddings.word_embeddings`, `layers.i.attention.self.query`, `layers.i.crossattention.*`,
`layers.i.intermediate.dense`, `layers.i.output.LayerNorm`), so the self-attention and FFN weights load from any
local BERT directory; the cross-attention weights are new (BERT init). There are no token-type embeddings (as in
SIMLA): a loaded BERT's token-type table is dropped, by name.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from models.checkpointing import run_layer
from models.fusion import attend
from models.init import init_bert_style
from models.text import TextConfig, resolve_path


class Projections(nn.Module):
    """query / key / value (transformers' `attention.self`); key and value read `kv_dim`-wide context."""

    def __init__(self, d: int, kv_dim: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv_dim, d), nn.Linear(kv_dim, d)


class Output(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm (BERT's post-LN sublayer output)."""

    def __init__(self, d_in: int, d: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class AttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int, eps: float, dropout: float, kv_dim: int):
        super().__init__()
        self.num_heads, self.attn_dropout = heads, dropout
        self.self = Projections(d, kv_dim)
        self.output = Output(d, d, eps, dropout)

    def forward(self, x, context, key_mask, return_attention: bool = False):
        p = self.self
        a, probs = attend(p.query(x), p.key(context), p.value(context), self.num_heads, key_mask,
                          self.attn_dropout if self.training else 0.0, return_attention)
        return self.output(a, x), probs


class Intermediate(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(d, hidden)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class Layer(nn.Module):
    """One BERT layer with cross-attention; the unit of activation checkpointing."""

    def __init__(self, d: int, heads: int, ffn: int, eps: float, dropout: float, context_dim: int):
        super().__init__()
        self.attention = AttentionBlock(d, heads, eps, dropout, d)
        self.crossattention = AttentionBlock(d, heads, eps, dropout, context_dim)
        self.intermediate = Intermediate(d, ffn)
        self.output = Output(ffn, d, eps, dropout)

    def forward(self, x, mask, context=None, context_mask=None, want_self: bool = False, want_cross: bool = False,
                num_queries: Optional[int] = None):
        """x (B, L, D) with key mask `mask` (B, L) bool; context None = text mode (no cross-attention).
        num_queries: only the first n tokens' outputs (they still attend to all of x)."""
        q = x if num_queries is None else x[:, :num_queries]
        p = self.attention.self
        a, self_probs = attend(p.query(q), p.key(x), p.value(x), self.attention.num_heads, mask,
                               self.attention.attn_dropout if self.training else 0.0, want_self)
        h = self.attention.output(a, q)
        cross_probs = None
        if context is not None:
            h, cross_probs = self.crossattention(h, context, context_mask, want_cross)
        return self.output(self.intermediate(h), h), self_probs, cross_probs


class Embeddings(nn.Module):
    """word + position embeddings -> LayerNorm -> dropout (no token types)."""

    def __init__(self, vocab: int, d: int, positions: int, eps: float, dropout: float, pad_id: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(positions, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if x.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"{x.shape[1]} tokens but the text model has {self.position_embeddings.num_embeddings} "
                             "position embeddings (the MIM query stream needs one per image token)")
        pos = self.position_embeddings.weight[: x.shape[1]]
        return self.dropout(self.LayerNorm(x + pos.to(x.dtype)))


class StreamOutput(NamedTuple):   # a NamedTuple so ZeRO-3 sees the tensors
    hidden: torch.Tensor               # (B, L, D); (B, n, D) with last_queries=n
    last_self_attention: Optional[torch.Tensor]   # (B, heads, Lq, L) of the last layer, when asked for
    cross_attentions: list             # per layer (B, heads, Lq, Lc), when asked for


class SingleStreamBert(nn.Module):
    """The BERT of `cfg` (a model.text config: `pretrained` a local BERT directory or "minilm", or sizes for a random
    init) with cross-attention to `context_dim`-wide tokens in every layer."""

    def __init__(self, cfg: TextConfig, context_dim: int):
        super().__init__()
        cfg.validate()
        hf = _hf_config(cfg)
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"model.text: the single-stream family needs a BERT model, got {hf.get('model_type')!r} "
                             f"(RoBERTa offsets its positions, which the MIM query stream cannot share)")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"model.text: hidden_act {hf.get('hidden_act')!r} is not supported (BERT's exact GELU)")
        d, self.num_heads = hf["hidden_size"], hf["num_attention_heads"]
        eps, drop = hf.get("layer_norm_eps", 1e-12), hf.get("hidden_dropout_prob", cfg.dropout)
        self.hidden_size, self.vocab_size = d, hf["vocab_size"]
        self.embeddings = Embeddings(self.vocab_size, d, hf["max_position_embeddings"], eps, drop,
                                     hf.get("pad_token_id") or 0)
        self.layers = nn.ModuleList(Layer(d, self.num_heads, hf["intermediate_size"], eps, drop, context_dim)
                                    for _ in range(hf["num_hidden_layers"]))
        init_bert_style(self)
        if cfg.pretrained is not None:
            self.dropped = load_hf_bert(self, resolve_path(cfg.pretrained))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The caption's non-contextualised embeddings: the multimodal pass's input and the MIM query stream's
        context."""
        return self.embeddings(input_ids=input_ids)

    def embed_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens as BERT inputs (SIMLA's `inputs_embeds`): BERT position embeddings and LayerNorm added."""
        return self.embeddings(inputs_embeds=tokens)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, return_cross: bool = False,
                return_last_self: bool = False, last_queries: Optional[int] = None) -> StreamOutput:
        """x: embedded inputs (B, L, D) (`embed` / `embed_inputs`); mask (B, L) 1 = real token (None = all).
        context None: text mode; else the tokens every layer cross-attends to, context_mask (B, Lc) or None.
        last_queries: the last layer computes only the first n tokens (their values are unchanged)."""
        m = None if mask is None else mask.bool()
        cm = None if context_mask is None else context_mask.bool()
        cross, last_self = [], None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, s, c = run_layer(layer, layer, x, m, context, cm, return_last_self and i == last, return_cross,
                                last_queries if i == last else None)
            if return_cross:
                cross.append(c)
            if i == last:
                last_self = s
        return StreamOutput(x, last_self, cross)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text mode: (B, L, D) contextualised text (the unimodal text encoder)."""
        return self(self.embed(input_ids), attention_mask).hidden


def _hf_config(cfg: TextConfig) -> dict:
    if cfg.pretrained is None:
        return {"model_type": "bert", "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
                "layer_norm_eps": cfg.layer_norm_eps or 1e-12, "hidden_dropout_prob": cfg.dropout,
                "hidden_act": "gelu", "pad_token_id": 0}
    import json
    import os

    with open(os.path.join(resolve_path(cfg.pretrained), "config.json")) as f:
        return json.load(f)


# transformers BERT key (after the optional "bert." prefix) -> ours; None = dropped (named in the report)
_DROPPED = ("embeddings.token_type_embeddings.weight", "embeddings.position_ids", "pooler.dense.weight",
            "pooler.dense.bias")


def hf_bert_key(key: str) -> Optional[str]:
    """A transformers BertModel state-dict key -> this module's key (None: dropped by name)."""
    key = key[5:] if key.startswith("bert.") else key
    if key in _DROPPED:
        return None
    if key.startswith("encoder.layer."):
        return "layers." + key[len("encoder.layer."):]
    return key


def load_hf_bert(model: SingleStreamBert, path: str) -> list[str]:
    """Self-attention, FFN and embeddings from the BERT at `path` (strict: every one of our non-cross-attention
    tensors must come from the file with its shape, every file tensor must map); -> the dropped file keys."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    ours = model.state_dict()
    want = {k for k in ours if ".crossattention." not in k}
    loaded, dropped, unknown = {}, [], []
    for k, v in hf.state_dict().items():
        o = hf_bert_key(k)
        if o is None:
            dropped.append(k)
        elif o not in want or ours[o].shape != v.shape:
            unknown.append(f"{k}{tuple(v.shape)}")
        else:
            loaded[o] = v
    missing = sorted(want - set(loaded))
    if missing or unknown:
        raise ValueError(f"model.text.pretrained={path}: does not fit the single-stream BERT: missing {missing[:5]}, "
                         f"unexpected {unknown[:5]}")
    model.load_state_dict(loaded, strict=False)
    return dropped
