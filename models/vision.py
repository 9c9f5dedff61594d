"""Flexible vision encoder: a timm ViT that takes images and videos alike.

Input is (B, F, 3, H, W); an image is a 1-frame video. Every frame is patchified with the ViT's own patch embedding and
gets its own CLS token and the spatial position embedding; for F > 1 (and for images with temporal_embed_images) a
learnable temporal embedding is added to every token of frame f (CLS included). Inside each block, frame-CLS tokens attend to all tokens of all frames while patch
tokens attend only within their own frame (its CLS and patches), using the ViT's pretrained attention weights, so
video needs no new attention parameters (SCL/GLSCL "flexible vision encoder", methods.md §1.2).

Output tokens are ordered [CLS_1..CLS_F, patches_1, ..., patches_F]; the global feature is the mean of the F CLS tokens.
For GLSCL, `forward` can also drop patches MAE-style (`keep`, after the position embeddings; MGSC) or replace patch
embeddings by a mask token (`token_mask`/`mask_token`, before the position embeddings; MLTC); videos use the same
positions in every frame (tube masking).

The timm model's submodules are adopted directly (patch_embed, cls_token, pos_embed, norm_pre, blocks, norm), so state
dict keys match timm's and every parameter belongs to a module whose forward runs (required by ZeRO-3, which gathers
a module's own parameters only when that module's forward is called).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from models.checkpointing import run_layer


@dataclass
class VisionConfig:
    timm_name: str = "vit_base_patch16_224"  # any timm VisionTransformer, e.g. vit_base_patch16_clip_224 (CLIP-style)
    img_size: int = 224
    patch_size: Optional[int] = None  # None keeps the timm default of the named model
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_last_blocks: int = 0  # METER/SCL drop the last CLIP block
    max_frames: int = 8  # size of the temporal embedding table
    # add temporal row 0 to images too (the released video model does, so an image and frame 0 of a video are
    # embedded alike in mixed runs); False (ours): images skip it and a pretrained image ViT computes what it learnt
    temporal_embed_images: bool = False
    # the temporal table's init std; null = width ** -0.5, the released code's `scale * randn`
    temporal_init_std: Optional[float] = 0.02
    drop_path_rate: float = 0.0
    # a vision-tower file written by `train/convert_checkpoint.py import` (timm ViT / OpenAI CLIP weights mapped to
    # this tower); loaded strictly at build, position embeddings resampled to img_size. None = random init.
    pretrained: Optional[str] = None
    # a learnable [MASK] patch embedding (zeros init) that `forward(token_mask=...)` mixes in before the position
    # embedding: SIMLA's image-side MIM (`visual_encoder.mask_token`); its momentum copy follows the tower's
    mask_token: bool = False

    def validate(self) -> None:
        """Every check that needs no weights: field ranges, the timm name, and the architecture it resolves to (built
        on the meta device, so nothing is allocated): a timm ViT the encoder supports, img_size a multiple of the
        patch size, drop_last_blocks leaving at least one block."""
        if self.drop_last_blocks < 0:
            raise ValueError(f"model.vision.drop_last_blocks must be >= 0, got {self.drop_last_blocks}")
        if self.max_frames < 1:
            raise ValueError(f"model.vision.max_frames must be >= 1, got {self.max_frames}")
        if self.temporal_init_std is not None and not self.temporal_init_std > 0:
            raise ValueError(f"model.vision.temporal_init_std must be null (width ** -0.5) or > 0, "
                             f"got {self.temporal_init_std}")
        if self.img_size < 1:
            raise ValueError(f"model.vision.img_size must be >= 1, got {self.img_size}")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.vision.{name} must be null (the timm default) or >= 1, got {value}")
        if self.mlp_ratio is not None and not self.mlp_ratio > 0:
            raise ValueError(f"model.vision.mlp_ratio must be null (the timm default) or > 0, got {self.mlp_ratio}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"model.vision.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not timm.is_model(self.timm_name):
            close = difflib.get_close_matches(self.timm_name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (see timm.list_models('vit_*'))"
            raise ValueError(f"model.vision.timm_name: unknown timm model {self.timm_name!r}{hint}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"model.vision.embed_dim={self.embed_dim} is not divisible by "
                             f"model.vision.num_heads={self.num_heads}")
        with torch.device("meta"):
            vit = create_vit(self)
        patch = tuple(vit.patch_embed.patch_size)
        if self.img_size % patch[0] or self.img_size % patch[1]:
            key = "model.vision.patch_size" if self.patch_size is not None else f"the patch size of {self.timm_name}"
            raise ValueError(f"model.vision.img_size={self.img_size} is not a multiple of {key} "
                             f"({'x'.join(map(str, patch))}); the border pixels would be cut off")


def create_vit(cfg: VisionConfig) -> VisionTransformer:
    """The timm ViT that VisionEncoder adopts, checked to be one the flexible encoder supports (ValueError
    naming model.vision.* otherwise). Under `torch.device("meta")` it only resolves the architecture."""
    overrides = {k: getattr(cfg, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
                 if getattr(cfg, k) is not None}
    if not timm.is_model(cfg.timm_name):
        raise ValueError(f"model.vision.timm_name: unknown timm model {cfg.timm_name!r}")
    try:
        vit = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, global_pool="",
                                img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate, **overrides)
    except TypeError as e:  # e.g. a CNN rejects img_size
        raise ValueError(f"model.vision.timm_name: {cfg.timm_name!r} is not a timm VisionTransformer ({e})") from None
    except (AssertionError, ValueError) as e:  # e.g. timm: "dim should be divisible by num_heads"
        msg = str(e) or type(e).__name__
        if "num_heads" in msg and ("embed_dim" in overrides or "num_heads" in overrides):
            with torch.device("meta"):   # the named model's own sizes, to say which pair disagrees
                ref = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, global_pool="")
            embed = cfg.embed_dim or ref.embed_dim
            heads = cfg.num_heads or ref.blocks[0].attn.num_heads
            default = lambda k: "" if getattr(cfg, k) is not None else f" (the default of {cfg.timm_name})"
            raise ValueError(f"model.vision.embed_dim={embed}{default('embed_dim')} is not divisible by "
                             f"model.vision.num_heads={heads}{default('num_heads')}") from None
        sizes = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "its default sizes"
        raise ValueError(f"model.vision: timm cannot build {cfg.timm_name!r} with {sizes}: {msg}") from None
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"model.vision.timm_name: {cfg.timm_name!r} is not a timm VisionTransformer")
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class or vit.pos_embed is None:
        raise ValueError(f"model.vision.timm_name: {cfg.timm_name!r} needs one class token, no register tokens "
                         "and an absolute position embedding that covers the class token")
    for blk in vit.blocks:
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise ValueError(f"model.vision.timm_name: {cfg.timm_name!r} has blocks whose attention is not "
                             "timm's fused-qkv Attention; the video path needs it")
    if len(vit.blocks) - cfg.drop_last_blocks < 1:
        raise ValueError(f"model.vision.drop_last_blocks={cfg.drop_last_blocks} leaves no block "
                         f"({len(vit.blocks)} in {cfg.timm_name})")
    return vit


class VisionOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 only finds output tensors inside tuples/lists/dicts, and it must see
    them to re-gather this module's own parameters (pos_embed, ...) for backward."""

    tokens: torch.Tensor  # (B, F + F*P, D): frame CLS tokens first, then every frame's patches
    num_frames: int

    @property
    def global_feature(self) -> torch.Tensor:
        return self.tokens[:, : self.num_frames].mean(1)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        vit = create_vit(cfg)
        keep = len(vit.blocks) - cfg.drop_last_blocks

        self.cfg = cfg
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.norm_pre = vit.norm_pre  # CLIP's ln_pre; Identity for plain ViTs
        self.blocks = nn.ModuleList(list(vit.blocks)[:keep])
        self.norm = vit.norm  # CLIP's ln_post is kept even when the last block is dropped (as METER does)
        self.embed_dim = vit.embed_dim
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        std = self.embed_dim ** -0.5 if cfg.temporal_init_std is None else cfg.temporal_init_std
        self.temporal_embed = nn.Parameter(torch.randn(1, cfg.max_frames, self.embed_dim) * std)
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "temporal_embed"} | ({"mask_token"} if self.cfg.mask_token else set())

    def embed(self, pixel_values: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
              mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, 1 + P, D) tokens with spatial (+ temporal) position embeddings added.

        token_mask (B, P) bool with mask_token (1, 1, D): those patch embeddings are replaced by the mask token before
        the position embedding is added (SimMIM/BEiT-style, GLSCL's MLTC); for videos the same positions are masked
        in every frame (tube masking). token_mask alone: the tower's own mask token (model.vision.mask_token).
        """
        if token_mask is not None and mask_token is None:
            if not self.cfg.mask_token:
                raise ValueError("token_mask without mask_token needs the tower's own (model.vision.mask_token)")
            mask_token = self.mask_token
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (B, F, 3, H, W), got shape {tuple(pixel_values.shape)}")
        b, f = pixel_values.shape[:2]
        if f > self.cfg.max_frames:
            raise ValueError(f"{f} frames given but model.vision.max_frames={self.cfg.max_frames}")
        if mask_token is not None and token_mask is None:
            raise ValueError("mask_token given without token_mask")
        x = pixel_values.flatten(0, 1).to(self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(x)
        if token_mask is not None:
            if token_mask.shape != (b, self.num_patches):
                raise ValueError(f"token_mask must be (B, P)=({b}, {self.num_patches}), got {tuple(token_mask.shape)}")
            m = token_mask.bool().repeat_interleave(f, dim=0).unsqueeze(-1)  # (B*F, P, 1), frame-minor like x
            x = torch.where(m, mask_token.to(x.dtype).reshape(1, 1, -1), x)
        x = x + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1).unflatten(0, (b, f))
        if f > 1 or self.cfg.temporal_embed_images:
            # By default images skip it, so a pretrained image ViT computes exactly what it was trained to.
            x = x + self.temporal_embed[:, :f].unsqueeze(2)
        return x

    def forward(self, pixel_values: torch.Tensor, keep: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None) -> VisionOutput:
        """keep (B, K) long patch indices: MAE-style dropping after the position (and temporal) embeddings are added;
        only every frame's CLS and the kept patches (the same indices in every frame: tube) go through the blocks,
        and the output is [CLS_1..CLS_F, kept_1..kept_F]. token_mask/mask_token: see `embed`."""
        x = self.embed(pixel_values, token_mask, mask_token)
        if keep is not None:
            b, f, _, d = x.shape
            if keep.dim() != 2 or keep.shape[0] != b:
                raise ValueError(f"keep must be (B, K) patch indices, got shape {tuple(keep.shape)}")
            idx = keep.long()[:, None, :, None].expand(b, f, keep.shape[1], d)
            x = torch.cat([x[:, :, :1], torch.gather(x[:, :, 1:], 2, idx)], dim=2)
        x = self.norm_pre(x)
        b, f, t, d = x.shape
        if f == 1:
            x = x.squeeze(1)
            for blk in self.blocks:
                x = run_layer(blk, blk, x)
            x = x.unsqueeze(1)
        else:
            for blk in self.blocks:
                x = run_layer(blk, _video_block, blk, x)
        x = self.norm(x)
        tokens = torch.cat([x[:, :, 0], x[:, :, 1:].flatten(1, 2)], dim=1)
        return VisionOutput(tokens=tokens, num_frames=f)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Strict load of timm-keyed ViT weights (a timm state dict, or a tower file of convert_checkpoint.py):
        pos_embed is resampled to this grid; the classifier (head, fc_norm) and the blocks beyond this tower's depth
        are dropped by name when exactly `drop_last_blocks` blocks are extra; without a temporal_embed the tower
        keeps its own init (SCL: scale x randn). Returns the dropped names; anything else that differs raises."""
        sd = dict(state_dict)
        if "pos_embed" in sd and sd["pos_embed"].shape != self.pos_embed.shape:
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=self.grid_size, num_prefix_tokens=1)
        depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
        extra = [k for k in sd if k.startswith("blocks.") and int(k.split(".")[1]) >= len(self.blocks)]
        if extra and depth - len(self.blocks) != self.cfg.drop_last_blocks:
            raise ValueError(f"vision weights have {depth} blocks, the tower {len(self.blocks)} with "
                             f"drop_last_blocks={self.cfg.drop_last_blocks}")
        dropped = sorted(extra + [k for k in sd if k.split(".")[0] in ("head", "fc_norm")])
        for k in dropped:
            del sd[k]
        sd.setdefault("temporal_embed", self.temporal_embed.detach().clone())
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"vision weights do not match: missing={missing} unexpected={unexpected}")
        return dropped


def _video_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One timm ViT block on (B, F, T, D) with frame-CLS global / patch within-frame attention."""
    b, f, t, d = x.shape
    attn = blk.attn
    h, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(blk.norm1(x)).reshape(b, f, t, 3, h, hd)
    q, k, v = qkv.unbind(3)  # (B, F, T, H, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = attn.attn_drop.p if attn.training else 0.0
    # Every token attends within its own frame (this is exact for patch rows) ...
    per_frame = lambda z: z.permute(0, 1, 3, 2, 4).reshape(b * f, h, t, hd)
    local = F.scaled_dot_product_attention(per_frame(q), per_frame(k), per_frame(v), dropout_p=p)
    local = local.reshape(b, f, h, t, hd)
    # ... and frame-CLS rows are recomputed against all tokens of all frames.
    all_frames = lambda z: z.permute(0, 3, 1, 2, 4).reshape(b, h, f * t, hd)
    cls_q = q[:, :, 0].permute(0, 2, 1, 3)  # (B, H, F, hd)
    cls = F.scaled_dot_product_attention(cls_q, all_frames(k), all_frames(v), dropout_p=p)
    out = torch.cat([cls.permute(0, 2, 1, 3).unsqueeze(3), local[:, :, :, 1:]], dim=3)  # (B, F, H, T, hd)
    out = out.permute(0, 1, 3, 2, 4).reshape(b, f, t, h * hd)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    x = x + blk.drop_path1(blk.ls1(out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
