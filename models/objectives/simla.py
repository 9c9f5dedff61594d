"""SIMLA's own objectives (methods.md §2.2): XMM's text side (MLM with momentum distillation), XMM's image side (MIM
with the image tokens as BERT's query stream) and PSL (pseudo-keyword prediction). ITA and ITM are the registry's
(models/objectives/ita.py, itm.py). All need the single-stream family (models/single_stream.py).

Every loss mixes a hard target with the momentum model's soft one by alpha, ramped from 0 over
`alpha_warmup_steps` optimizer steps (SIMLA: alpha * min(1, i / len(loader)) in epoch 0):
  xmm_mlm = (1 - a) CE(logits, ids) + a SoftCE(logits, softmax(logits_m))            over the masked tokens
  xmm_mim = (1 - a) CE(logits, dVAE codes) + a SoftCE(logits, softmax(logits_m))     over the masked patches
  psl     = (1 - a) BCE(z, y_hard) + a BCE(z, sigmoid(z_m))                         over B x vocabulary
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.init import init_bert_style
from models.masking import blockwise_mask
from models.objectives.base import BuildEnv, Objective, ObjectiveOutput, check_weight
from models.objectives.mlm import MlmConfig, build_masker
from models.passes import ImageEncoding, MomentumEncoding


def ramped(alpha: float, warmup_steps: int, step: Optional[int]) -> float:
    """alpha * min(1, step / warmup_steps); alpha itself without a step or a warmup."""
    if step is None or warmup_steps == 0:
        return alpha
    return alpha * min(1.0, float(step) / warmup_steps)


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(-1).mean()


def _check_distill(where: str, cfg) -> None:
    check_weight(f"{where}.weight", cfg.weight)
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"{where}.alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.alpha_warmup_steps < 0:
        raise ValueError(f"{where}.alpha_warmup_steps must be >= 0, got {cfg.alpha_warmup_steps}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"{where}.momentum must be in [0, 1), got {cfg.momentum}")


# ------------------------------------------------------------------------------------------------ XMM, text side
class LMTransform(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMHead(nn.Module):
    """BERT's MLM head (transformers' `cls.predictions`): dense -> GELU -> LayerNorm -> vocabulary; the decoder
    weight may be the text embedding table itself (tied, as BertForMaskedLM and SIMLA)."""

    def __init__(self, d: int, vocab: int, eps: float, tied: Optional[nn.Parameter] = None):
        super().__init__()
        self.transform = LMTransform(d, eps)
        self.decoder = nn.Linear(d, vocab)
        init_bert_style(self)
        if tied is not None:
            self.decoder.weight = tied

    def forward(self, x):
        return self.decoder(self.transform(x))


@dataclass
class XmmTextConfig:
    weight: float = 1.0
    mask_prob: float = 0.15
    alpha: float = 0.4
    alpha_warmup_steps: int = 0
    momentum: float = 0.995
    tie_decoder: bool = True   # the MLM decoder weight is the word-embedding table (BERT, SIMLA)

    def validate(self) -> None:
        _check_distill("objectives.xmm_text", self)
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"objectives.xmm_text.mask_prob must be in (0, 1), got {self.mask_prob}")


class XmmText(Objective):
    """MLM conditioned on the image through the multimodal BERT, distilled from the momentum BERT + MLM head run on
    the same masked caption and the momentum ViT's image tokens. BERT masking (models/masking.py bert_mask: no
    special token is ever masked; SIMLA's rule excludes only [PAD] and [CLS], so its [SEP] can be masked)."""
    name, Config = "xmm_text", XmmTextConfig
    reads = (ImageEncoding, MomentumEncoding)
    heads = ("itc",)   # the momentum pass copies the retrieval path, ITC head included (xmm_text alone must build)
    batch_keys = ("mlm_input_ids", "mlm_labels")
    families = ("single_stream",)

    def __init__(self, cfg: XmmTextConfig, env: BuildEnv):
        super().__init__(cfg, env)
        text = env.backbone.text
        self.masker = build_masker(MlmConfig(mask_prob=cfg.mask_prob), env.tokenizer)
        self.head = LMHead(text.hidden_size, text.vocab_size, text.embeddings.LayerNorm.eps,
                           text.embeddings.word_embeddings.weight if cfg.tie_decoder else None)
        env.use(MomentumEncoding, coefficient=cfg.momentum)
        env.momentum_copy(f"objectives.{self.name}.head", cfg.momentum)

    @classmethod
    def check_run(cls, cfg, run) -> None:
        p = run.data.mlm_probability
        if p is not None and abs(cfg.mask_prob - p) > 1e-9:
            raise ValueError(f"data.mlm_probability={p} disagrees with objectives.xmm_text.mask_prob={cfg.mask_prob}")

    def forward(self, ctx) -> ObjectiveOutput:
        model = ctx.model
        if ctx.mlm_labels is not None:
            masked, labels = ctx.mlm_input_ids, ctx.mlm_labels
        else:
            masked, labels = self.masker(ctx.input_ids, ctx.attention_mask)
        where = labels != -100
        scale = 1.0
        if not where.any():
            # Nothing selected (empty captions, or a small batch's unlucky draw): run the same passes on a zero-weight
            # stand-in target (each caption's first token). Skipping them would hang ZeRO-3, where every rank must
            # run the same modules in the same order (the other ranks wait in their parameter all-gathers).
            where = torch.zeros_like(where)
            where[:, 0] = True
            labels = ctx.input_ids.masked_fill(~where, -100)
            scale = 0.0
        mask = ctx.attention_mask
        out = model.fuse(model.fusion_text(masked, mask), mask, ctx.image)
        logits = self.head(out.text[where]).float()
        target = labels[where]
        alpha = ramped(self.cfg.alpha, self.cfg.alpha_warmup_steps, ctx.step)
        with torch.no_grad():
            mom = ctx.get(MomentumEncoding)
            text_m = model.momentum.copy_of("text")
            h_m = text_m(text_m.embed(masked), mask, mom.image_tokens.tokens).hidden
            soft = F.softmax(model.momentum.copy_of(f"objectives.{self.name}.head")(h_m[where]).float(), dim=-1)
        loss = (1 - alpha) * F.cross_entropy(logits, target) + alpha * soft_ce(logits, soft)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput({"xmm_mlm": loss * scale}, {"xmm_mlm_acc": acc.detach() * scale})


# ----------------------------------------------------------------------------------------------- XMM, image side
@dataclass
class RandomTokenizerConfig:
    """A small RANDOMLY INITIALISED stand-in for the DALL-E dVAE (tests, the CPU demo): its codes are a fixed
    function of the pixels, a learnable but meaningless target."""
    vocab_size: int = 512
    hidden: int = 16
    seed: int = 0


@dataclass
class XmmImageConfig:
    weight: float = 1.0
    alpha: float = 0.4
    alpha_warmup_steps: int = 0
    momentum: float = 0.995
    # BEiT blockwise masking per sample (SIMLA: 75 of the 16 x 16 patches, blocks of >= 16, aspect 0.3 - 3.33)
    num_masked: int = 75
    min_block: int = 16
    max_block: Optional[int] = None
    min_aspect: float = 0.3
    # the image tokenizer: a dVAE file written by `convert_checkpoint.py import --format dalle-dvae`, or a random one
    tokenizer: Optional[str] = None
    random_tokenizer: Optional[RandomTokenizerConfig] = None

    def validate(self) -> None:
        _check_distill("objectives.xmm_image", self)
        if self.num_masked < 1 or self.min_block < 1:
            raise ValueError("objectives.xmm_image: num_masked and min_block must be >= 1")
        if self.max_block is not None and self.max_block < 1:
            raise ValueError(f"objectives.xmm_image.max_block must be null or >= 1, got {self.max_block}")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"objectives.xmm_image.min_aspect must be in (0, 1], got {self.min_aspect}")
        if (self.tokenizer is None) == (self.random_tokenizer is None):
            raise ValueError("objectives.xmm_image: set exactly one of `tokenizer` (a dVAE .safetensors file from "
                             "`convert_checkpoint.py import --format dalle-dvae`) and `random_tokenizer`")


class XmmImage(Objective):
    """Masked image modelling with the image tokens as BERT's query stream:
        Z = ViT(I, blockwise mask -> mask token before the position embedding)
        H = BERT(embed_inputs(Z), cross-attending to BERT.embed(caption))     (non-contextualised caption)
        logits = head(H[:, 1:]) at the masked patches, target = dVAE codes of the tokenizer view
    The momentum branch: the momentum ViT and BERT on the same mask, with the online caption embeddings (SIMLA)."""
    name, Config = "xmm_image", XmmImageConfig
    batch_keys = ("tokenizer_pixels",)
    families = ("single_stream",)

    def __init__(self, cfg: XmmImageConfig, env: BuildEnv):
        super().__init__(cfg, env)
        backbone = env.backbone
        if not backbone.cfg.vision.mask_token:
            raise ValueError("objectives.xmm_image: needs the ViT's mask token (set model.vision.mask_token: true)")
        gh, gw = self._grid = tuple(backbone.vision.grid_size)
        if cfg.num_masked > gh * gw:
            raise ValueError(f"objectives.xmm_image.num_masked={cfg.num_masked} is more than the {gh}x{gw} patches")
        from models.dvae import load_dvae, small_random_dvae

        r = cfg.random_tokenizer
        dvae = load_dvae(cfg.tokenizer) if r is None else small_random_dvae(r.vocab_size, r.hidden, seed=r.seed)
        object.__setattr__(self, "dvae", dvae)   # not a submodule: never trained, cast, partitioned nor saved
        self.head = nn.Linear(backbone.hidden_size, dvae.vocab_size)
        init_bert_style(self.head)
        for name in ("vision", "text", f"objectives.{self.name}.head"):
            env.momentum_copy(name, cfg.momentum)

    def masks(self, batch: int, device) -> torch.Tensor:
        """(B, P) bool, a fresh blockwise mask per sample (drawn from torch's CPU generator, so a resumed run with
        restored RNG states draws the same)."""
        c = self.cfg
        gh, gw = self.grid
        rng = random.Random(int(torch.randint(2 ** 62, (1,))))
        rows = [blockwise_mask(gh, gw, c.num_masked, c.min_block, rng, c.max_block, c.min_aspect)
                for _ in range(batch)]
        return torch.stack(rows).to(device)

    def codes(self, tokenizer_pixels: torch.Tensor) -> torch.Tensor:
        dvae = self.dvae
        if next(dvae.parameters()).device != tokenizer_pixels.device:
            dvae.to(tokenizer_pixels.device)
        codes = dvae.codes(tokenizer_pixels)
        if codes.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"objectives.xmm_image: the tokenizer view gives {codes.shape[1]} codes but the ViT has "
                             f"{self.grid[0]}x{self.grid[1]} patches (data.tokenizer_view.size must be 8 x the grid)")
        return codes

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    def forward(self, ctx) -> ObjectiveOutput:
        model = ctx.model
        px = ctx.pixel_values
        if px.shape[1] != 1:
            raise ValueError("objectives.xmm_image: MIM is image-only (got a video batch)")
        tok = ctx.batch.get("tokenizer_pixels")
        if tok is None:
            raise ValueError("objectives.xmm_image: the batch has no tokenizer_pixels (set data.tokenizer_view)")
        mask = self.masks(px.shape[0], px.device)
        codes = self.codes(tok)
        ids, amask = ctx.input_ids, ctx.attention_mask
        text = model.text
        z = model.encode_image(px, token_mask=mask).tokens
        caption = text.embed(ids)
        h = text(text.embed_inputs(z), None, caption, amask).hidden
        logits = self.head(h[:, 1:][mask]).float()
        target = codes[mask]
        alpha = ramped(self.cfg.alpha, self.cfg.alpha_warmup_steps, ctx.step)
        with torch.no_grad():
            m = model.momentum
            vision_m, text_m = m.copy_of("vision"), m.copy_of("text")
            z_m = vision_m(px, token_mask=mask).tokens
            h_m = text_m(text_m.embed_inputs(z_m), None, caption.detach(), amask).hidden
            soft = F.softmax(m.copy_of(f"objectives.{self.name}.head")(h_m[:, 1:][mask]).float(), dim=-1)
        loss = (1 - alpha) * F.cross_entropy(logits, target) + alpha * soft_ce(logits, soft)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput({"xmm_mim": loss}, {"xmm_mim_acc": acc.detach(),
                                                   "xmm_mim_masked": mask.float().sum(1).mean()})


# ------------------------------------------------------------------------------------------------------------- PSL
def keyword_positions(attention: torch.Tensor, valid: torch.Tensor, per_head: int, keywords: int,
                      rule: str = "ours") -> tuple[torch.Tensor, torch.Tensor]:
    """attention (B, heads, L): each head's CLS-query self-attention; valid (B, L) bool: positions that may be
    keywords -> (positions (B, keywords) long, chosen (B, keywords) bool).
    ours: each head votes for its `per_head` most attended valid positions (fewer when fewer are valid; ties to the
    earlier position); the `keywords` most voted positions with at least one vote are chosen, ties to the earlier
    position.
    official: SIMLA's rule: top-k over every position (padding and specials included), then the top `keywords`
    vote counts, zero-vote positions included (torch.topk's tie order); every pick counts as chosen."""
    b, _, length = attention.shape
    a = attention.float()
    if rule == "official":
        top = a.reshape(-1, length).topk(min(per_head, length), dim=-1).indices.reshape(b, -1)
        counts = torch.zeros(b, length, device=a.device).scatter_add_(1, top, torch.ones_like(top, dtype=a.dtype))
        pos = counts.topk(min(keywords, length), dim=1).indices
        return pos, torch.ones_like(pos, dtype=torch.bool)
    a = a.masked_fill(~valid[:, None, :], float("-inf"))
    # a stable sort, not topk: tied attention votes for the earlier position (torch.topk's tie order is
    # unspecified and differs between devices)
    vals, top = (t[..., :min(per_head, length)] for t in a.sort(dim=-1, descending=True, stable=True))
    votes = torch.isfinite(vals).to(a.dtype)
    counts = torch.zeros(b, length, device=a.device).scatter_add_(1, top.reshape(b, -1), votes.reshape(b, -1))
    # rank by votes, then by earlier position: votes * (L + 1) - position is exact in float32 for any caption
    key = counts * (length + 1) - torch.arange(length, device=a.device, dtype=a.dtype)
    pos = key.topk(min(keywords, length), dim=1).indices
    return pos, counts.gather(1, pos) > 0


@dataclass
class PslConfig:
    weight: float = 1.0
    alpha: float = 0.4
    alpha_warmup_steps: int = 0
    momentum: float = 0.995
    per_head: int = 4      # positions each attention head votes for
    keywords: int = 5      # most-voted positions kept as the caption's keywords
    rule: Literal["ours", "official"] = "ours"   # see keyword_positions

    def validate(self) -> None:
        _check_distill("objectives.psl", self)
        if self.per_head < 1 or self.keywords < 1:
            raise ValueError("objectives.psl: per_head and keywords must be >= 1")
        if self.rule not in ("ours", "official"):
            raise ValueError(f"objectives.psl.rule: expected 'ours' or 'official', got {self.rule!r}")


class PSL(Objective):
    """Pseudo-keyword prediction from the image ITC embedding alone. Hard keywords: the momentum BERT in multimodal
    mode (on the online image tokens, as SIMLA) votes with its last layer's CLS self-attention; soft keywords:
    sigmoid(momentum concept head(momentum image embedding)). The concept head maps the 256-d embedding to the text
    vocabulary."""
    name, Config = "psl", PslConfig
    reads = (ImageEncoding, MomentumEncoding)
    heads = ("itc",)
    families = ("single_stream",)

    def __init__(self, cfg: PslConfig, env: BuildEnv):
        super().__init__(cfg, env)
        backbone = env.backbone
        self.concept_head = nn.Linear(backbone.itc.cfg.embed_dim, backbone.text.vocab_size)
        init_bert_style(self.concept_head)
        self.register_buffer("special_ids", torch.tensor(env.special_ids, dtype=torch.long), persistent=False)
        self.cls_id = env.tokenizer.cls_token_id
        env.use(MomentumEncoding, coefficient=cfg.momentum)
        env.momentum_copy(f"objectives.{self.name}.concept_head", cfg.momentum)

    def keywords(self, model, ctx) -> torch.Tensor:
        """(B, vocab) float multi-hot of the caption's keyword ids (no gradient)."""
        ids, mask = ctx.input_ids, ctx.attention_mask
        text_m = model.momentum.copy_of("text")
        out = text_m(text_m.embed(ids), mask, ctx.image.tokens.detach(), return_last_self=True, last_queries=1)
        valid = mask.bool() & ~torch.isin(ids, self.special_ids)
        pos, chosen = keyword_positions(out.last_self_attention[:, :, 0], valid, self.cfg.per_head,
                                        self.cfg.keywords, self.cfg.rule)
        y = torch.zeros(ids.shape[0], self.concept_head.out_features, device=ids.device)
        # amax, not a plain scatter: an unchosen filler position holding a keyword's id must not erase it
        y.scatter_reduce_(1, ids.gather(1, pos), chosen.float(), reduce="amax")
        if self.cfg.rule == "official":
            y[:, self.cls_id] = 0
        return y

    def forward(self, ctx) -> ObjectiveOutput:
        model = ctx.model
        v = model.itc(image_global=ctx.image.global_)[0]
        alpha = ramped(self.cfg.alpha, self.cfg.alpha_warmup_steps, ctx.step)
        with torch.no_grad():
            hard = self.keywords(model, ctx)
            soft = torch.sigmoid(model.momentum.copy_of(f"objectives.{self.name}.concept_head")(
                ctx.get(MomentumEncoding).image).float())
        z = self.concept_head(v.to(self.concept_head.weight.dtype)).float()
        loss = ((1 - alpha) * F.binary_cross_entropy_with_logits(z, hard)
                + alpha * F.binary_cross_entropy_with_logits(z, soft))
        return ObjectiveOutput({"psl": loss}, {"psl_keywords": hard.sum(1).mean()})
