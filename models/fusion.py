"""Cross-modal fusion: METER/SCL-style co-attention in plain PyTorch on F.scaled_dot_product_attention.

Two stacks of equal depth, one for text and one for image tokens. Layer i of each stream runs self-attention,
cross-attention to the *other* stream's layer-(i-1) output, then an FFN (BERT post-LN layout); both streams of a depth
are computed from the same inputs. Cross-attention probabilities can be returned (ALIGN-BENCH and Grad-CAM read the
text->image maps of the last layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpointing import run_layer
from models.init import init_bert_style


@dataclass
class FusionConfig:
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # modality-type embedding rows: text 0, image 1; NLVR2 adds 2 for the second image (SCL's third type)
    num_token_types: int = 2

    def validate(self) -> None:
        for name in ("hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.fusion.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.fusion.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"model.fusion.num_layers must be >= 1, got {self.num_layers}")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"model.fusion.mlp_ratio must be > 0 (an FFN of at least 1 unit), got {self.mlp_ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.fusion.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"model.fusion.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.num_token_types < 2:
            raise ValueError(f"model.fusion.num_token_types must be >= 2 (text, image), got {self.num_token_types}")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x, context, key_mask: Optional[torch.Tensor], return_attention: bool = False):
        """x (B, Lq, D) attends to context (B, Lk, D); key_mask (B, Lk) bool, True = attend, None = all."""
        return attend(self.q(x), self.k(context), self.v(context), self.num_heads, key_mask,
                      self.dropout if self.training else 0.0, return_attention)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, key_mask: Optional[torch.Tensor],
           dropout: float = 0.0, return_attention: bool = False):
    """Multi-head attention of projected q (B, Lq, D) on k, v (B, Lk, D) -> ((B, Lq, D), probs or None).
    key_mask (B, Lk) bool, True = attend; dropout: the attention-probability dropout (0 in eval)."""
    head_dim = q.shape[-1] // num_heads
    split = lambda z: z.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if return_attention:  # explicit softmax so the probabilities can be handed out
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        out = F.dropout(probs, dropout, dropout > 0) @ v
    else:
        probs = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).flatten(2), probs


class CrossLayer(nn.Module):
    """self-attn -> add&LN -> cross-attn -> add&LN -> FFN -> add&LN."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.num_heads, cfg.dropout)
        self.self_out = nn.Linear(d, d)
        self.self_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.dropout)
        self.cross_out = nn.Linear(d, d)
        self.cross_norm = nn.LayerNorm(d, eps=eps)
        hidden = int(d * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, x_mask, context, context_mask, return_attention: bool = False,
                num_queries: Optional[int] = None):
        """num_queries: compute only the first n tokens' outputs (they still attend to all of x): the last layer of a
        pass whose caller reads only the CLS token(s) skips the rest, with identical results for those tokens."""
        q = x if num_queries is None else x[:, :num_queries]
        a, _ = self.self_attn(q, x, x_mask)
        x = self.self_norm(q + self.drop(self.self_out(a)))
        a, probs = self.cross_attn(x, context, context_mask, return_attention)
        x = self.cross_norm(x + self.drop(self.cross_out(a)))
        x = self.ffn_norm(x + self.drop(self.ffn(x)))
        return x, probs


class CoAttentionBlock(nn.Module):
    """One depth of the two stacks; the unit of activation checkpointing."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.text = CrossLayer(cfg)
        self.image = CrossLayer(cfg)

    def forward(self, t, t_mask, v, v_mask, return_attention: bool = False, text_queries: int = -1,
                image_queries: int = -1):
        """*_queries: -1 = every token, 0 = skip that stream (its output is not needed), n = the first n tokens."""
        t_new = t2v = v_new = v2t = None
        if text_queries:
            t_new, t2v = self.text(t, t_mask, v, v_mask, return_attention, None if text_queries < 0 else text_queries)
        if image_queries:
            v_new, v2t = self.image(v, v_mask, t, t_mask, return_attention,
                                    None if image_queries < 0 else image_queries)
        return t_new, v_new, t2v, v2t


class FusionOutput(NamedTuple):  # a NamedTuple so ZeRO-3 sees the tensors (see VisionOutput)
    text: Optional[torch.Tensor]  # (B, Lt, D); (B, 1, D) for text_out="cls"; None for "none"
    image: Optional[torch.Tensor]  # (B, Nv, D); (B, F, D) (frame CLS tokens) for image_out="cls"; None for "none"
    cls_feats: Optional[torch.Tensor]  # (B, 2D): [pooled text ; pooled image]; None unless both streams are kept
    text_to_image_attentions: list  # per layer (B, heads, Lt, Nv), empty unless requested
    image_to_text_attentions: list


_OUTS = ("all", "cls", "none")


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, text_dim: int, vision_dim: int):
        super().__init__()
        cfg.validate()
        d = cfg.hidden_size
        self.hidden_size = d
        # Per-modality input transforms ("cross_modal_*_transform") and modality-type embeddings (text 0, image 1,
        # more image types with cfg.num_token_types > 2: NLVR2's second image is type 2).
        self.text_in = nn.Linear(text_dim, d)
        self.image_in = nn.Linear(vision_dim, d)
        self.num_token_types = cfg.num_token_types
        self.token_type = nn.Embedding(cfg.num_token_types, d)
        self.layers = nn.ModuleList(CoAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.text_pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.image_pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        init_bert_style(self)

    def project_text(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return self.text_in(text_hidden)

    def project_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.image_in(image_tokens)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, num_frames: int,
                image_mask: Optional[torch.Tensor] = None, return_attention: bool = False,
                text_out: str = "all", image_out: str = "all", image_token_type: int = 1) -> FusionOutput:
        """text/image: projected tokens from project_text/project_image; text_mask (B, Lt) 1 = real token.
        image_token_type: the image tokens' type row (text is always 0): 1, or 2.. with num_token_types > 2.

        text_out / image_out say which last-layer outputs the caller reads: "all" tokens, only the "cls" token(s)
        (the frame CLS tokens for video), or "none". The last layer computes only those (ITM reads only CLS
        features, MLM only text), which saves a sixth of a pass's fusion FLOPs without changing any value read."""
        if text_out not in _OUTS or image_out not in _OUTS:
            raise ValueError(f"text_out/image_out must be one of {_OUTS}, got {text_out!r}/{image_out!r}")
        # queries of the last layer: -1 = all tokens, 0 = skip the stream, n = the first n tokens
        tq = {"all": -1, "cls": 1, "none": 0}[text_out]
        vq = {"all": -1, "cls": num_frames, "none": 0}[image_out]
        if not (isinstance(image_token_type, int) and 1 <= image_token_type < self.num_token_types):
            raise ValueError(f"image_token_type must be in [1, {self.num_token_types}) (model.fusion.num_token_types "
                             f"{self.num_token_types}), got {image_token_type!r}")
        types = self.token_type(torch.arange(self.num_token_types, device=text.device))
        t, v = text + types[0], image + types[image_token_type]
        t_mask = text_mask.bool()
        v_mask = None if image_mask is None else image_mask.bool()
        t2v_maps, v2t_maps = [], []
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            t, v, t2v, v2t = run_layer(block, block, t, t_mask, v, v_mask, return_attention,
                                       tq if i == last else -1, vq if i == last else -1)
            if return_attention:
                t2v_maps.append(t2v)
                v2t_maps.append(v2t)
        cls_feats = None
        if t is not None and v is not None:
            pooled_text = self.text_pooler(t[:, 0])
            pooled_image = self.image_pooler(v[:, :num_frames].mean(1))  # video: mean of the frame CLS tokens
            cls_feats = torch.cat([pooled_text, pooled_image], dim=-1)
        return FusionOutput(t, v, cls_feats, t2v_maps, v2t_maps)
