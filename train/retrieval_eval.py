"""Fine-tuned retrieval evaluation: ITC similarities pick each query's top k, the fusion encoder re-scores them.

    metrics = rerank_retrieval(model, to_device, media_batches, texts, txt2media, k_i2t=128, k_t2i=128,
                               rank=dist.rank, world_size=dist.world_size)

The procedure of ALBEF's `evaluation()` (and SCL's re-ranked recall), arranged for ZeRO-3:
  1. Every rank embeds ALL media and ALL texts (under ZeRO-3 each forward needs every rank anyway). One vision
     forward per media batch gives both the fusion's image tokens (`encode_image`) and the ITC embedding (the ITC
     head on the mean of the projected frame CLS tokens, `ImageTokens.global_`: the same value `embed_image`
     computes, because the fusion's input projection is applied per token). Texts likewise: one text-tower pass
     gives the fusion's text tokens and, from their CLS token, the ITC embedding. The fusion inputs are kept on
     the CPU in the model's dtype (memory: N_media x tokens x D for images, e.g. 5k COCO images x 577 x 768 in
     bf16 = 4.4 GB; texts are first trimmed to the longest real caption); sim = image_emb @ text_emb.T (float32).
  2. i2t: the top-k_i2t texts of each media query (by sim) are re-scored by `pair_score` on (text, media) through
     the fusion encoder; t2i: the top-k_t2i media of each text query likewise. The default pair score is the ITM
     positive-class logit (`itm_pair_score`); `models.tasks.retrieval.rank_pair_score` is the SCL rank head's.
  3. Score matrices: a re-scored entry holds its pair score, every other entry -inf, so nothing outside a query's
     ITC top k can outrank anything inside it. Ranking order = pair score, ties broken by the ITC similarity (then
     by the lower index); the -inf entries are therefore ranked among themselves by ITC similarity, which makes
     R@10 meaningful when k < 10.
  4. Queries are split over ranks in contiguous chunks of ceil(Q / world_size); every rank scores exactly
     chunk x k pairs in the same number of fusion calls (`pair_batch_size` pairs each; the last chunk is padded
     with dummy queries whose results are discarded), since ZeRO-3 needs every rank in every forward. The ranks'
     (chunk, k) scores and indices are all-gathered (one collective per direction), so the result is identical on
     every rank.

Metrics are fractions in [0, 1] (as train/evaluation.py's; multiply by 100 for the papers' percentages). A media
item has several texts (`txt2media`): media->text counts a hit when ANY of its texts is in the top k; medr is the
median over queries of the 1-based rank of the best-ranked correct item (numpy's median: the mean of the two middle
values for an even count). The model is used as given (the caller puts it in eval mode).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import torch
import torch.distributed as dist

from models.backbone import ImageTokens

PairScore = Callable[..., torch.Tensor]   # (model, text, text_mask, image_tokens: ImageTokens) -> (n,)


def itm_pair_score(model, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: ImageTokens) -> torch.Tensor:
    """(n,) the ITM head's positive-class logit of each (text, image) pair (ALBEF's re-ranking score)."""
    out = model.fuse(text, text_mask, image_tokens, text_out="cls", image_out="cls")
    return model.itm_head(out.cls_feats)[:, 1]


@dataclass
class Embedded:
    """Everything the re-ranking needs from the encoders (step 1); computed once, re-ranked at any k."""
    image_tokens: torch.Tensor   # (N, Nv, D) the fusion's image input, CPU, model dtype
    num_frames: int
    text_tokens: torch.Tensor    # (T, L, D) the fusion's text input, CPU, model dtype
    text_mask: torch.Tensor      # (T, L) int64, CPU
    sim: torch.Tensor            # (N, T) float32 ITC similarities, CPU
    device: torch.device         # where the model computed (collectives on nccl use it)
    seconds: float = 0.0

    @property
    def num_media(self) -> int:
        return self.sim.shape[0]

    @property
    def num_texts(self) -> int:
        return self.sim.shape[1]


def _itc(model):
    if getattr(model, "heads", None) is not None and "itc" not in model.heads:
        raise ValueError("rerank_retrieval: the model has no 'itc' head (its top-k candidates come from ITC)")
    return model.itc


@torch.no_grad()
def embed_all(model, to_device, media_batches: Iterable[dict], texts: dict, *, text_batch_size: int = 64) -> Embedded:
    """Step 1: the fusion inputs and ITC embeddings of every media item and text (see the module docstring)."""
    start = time.perf_counter()
    itc = _itc(model)
    positions, tokens, img_embs = [], [], []
    num_frames, device = None, None
    for batch in media_batches:
        valid = batch["valid"].bool()
        b = to_device(batch)
        img = model.encode_image(b["pixel_values"])
        z = itc(image_global=img.global_)[0]
        if num_frames is None:
            num_frames, device = img.num_frames, z.device
        elif img.num_frames != num_frames:
            raise ValueError(f"rerank_retrieval: media batches with {num_frames} and {img.num_frames} frames")
        keep = valid.to(z.device)
        positions.append(batch["index"][valid].long())
        tokens.append(img.tokens[keep].cpu())
        img_embs.append(z[keep].float().cpu())
    if not positions:
        raise ValueError("rerank_retrieval: no media batches")
    positions_t = torch.cat(positions)
    n = positions_t.numel()
    if n == 0 or not torch.equal(positions_t.sort().values, torch.arange(n)):
        raise ValueError(f"rerank_retrieval: the valid media rows must carry each index 0..N-1 exactly once "
                         f"(got {n} rows, indices {positions_t.tolist()[:10]}...)")
    image_tokens, img_emb = torch.cat(tokens), torch.cat(img_embs)
    del tokens
    if not torch.equal(positions_t, torch.arange(n)):   # batches out of order: one permuting copy
        inverse = torch.empty_like(positions_t)
        inverse[positions_t] = torch.arange(n)   # row of the concatenation that holds media position p
        image_tokens, img_emb = image_tokens[inverse], img_emb[inverse]

    ids, mask = texts["input_ids"], texts["attention_mask"]
    if ids.shape[0] == 0:
        raise ValueError("rerank_retrieval: no texts")
    used = mask.bool().any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1   # trim the columns that are padding in every text
    ids, mask = ids[:, :length], mask[:, :length]
    text_tokens, txt_embs = [], []
    for s in range(0, ids.shape[0], text_batch_size):
        b = to_device({"input_ids": ids[s:s + text_batch_size], "attention_mask": mask[s:s + text_batch_size]})
        t = model.encode_text(b["input_ids"], b["attention_mask"])
        txt_embs.append(itc(text_global=t[:, 0])[1].float().cpu())
        # the fusion's text input: these tokens (co-attention) or the caption embeddings (single stream)
        f = t if model.fuses_text_encoding else model.fusion_text(b["input_ids"], b["attention_mask"])
        text_tokens.append(f.cpu())
    txt_emb = torch.cat(txt_embs)
    return Embedded(image_tokens, num_frames, torch.cat(text_tokens), mask.clone(), img_emb @ txt_emb.T, device,
                    time.perf_counter() - start)


def _chunk(num_queries: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, end, chunk): this rank's contiguous queries [start, end) and the padded per-rank count."""
    chunk = math.ceil(num_queries / world_size)
    start = min(rank * chunk, num_queries)
    return start, min(start + chunk, num_queries), chunk


def _distributed(world_size: int) -> bool:
    if world_size <= 1:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"rerank_retrieval: world_size={world_size} but torch.distributed is not initialized")
    if dist.get_world_size() != world_size:
        raise ValueError(f"rerank_retrieval: world_size={world_size} but the process group has "
                         f"{dist.get_world_size()} ranks")
    return True


@torch.no_grad()
def _rerank_direction(model, to_device, emb: Embedded, query_media: bool, k: int, rank: int, world_size: int,
                      pair_batch_size: int, pair_score: PairScore) -> torch.Tensor:
    """The (Q, C) score matrix of one direction: pair scores at each query's ITC top k, -inf elsewhere."""
    sim = emb.sim if query_media else emb.sim.T
    q_count, c_count = sim.shape
    top = sim.topk(k, dim=1).indices                     # (Q, k), identical on every rank (same inputs)
    start, end, chunk = _chunk(q_count, rank, world_size)
    queries = torch.arange(start, end)
    queries = torch.cat([queries, queries.new_zeros(chunk - queries.numel())])   # dummy queries: query 0
    cand = top[queries]                                   # (chunk, k)
    q_flat = queries.repeat_interleave(k)
    c_flat = cand.reshape(-1)
    media_idx, text_idx = (q_flat, c_flat) if query_media else (c_flat, q_flat)
    scores = []
    for s in range(0, media_idx.numel(), pair_batch_size):   # the same number of calls on every rank
        m, t = media_idx[s:s + pair_batch_size], text_idx[s:s + pair_batch_size]
        b = to_device({"text": emb.text_tokens[t], "text_mask": emb.text_mask[t], "image": emb.image_tokens[m]})
        out = pair_score(model, b["text"], b["text_mask"], ImageTokens(b["image"], emb.num_frames))
        scores.append(out.reshape(-1).float().cpu())
    local = torch.stack([torch.cat(scores).reshape(chunk, k).double(), cand.double()], dim=-1)   # (chunk, k, 2)
    if _distributed(world_size):
        comm = torch.device("cpu") if dist.get_backend() == "gloo" else emb.device
        parts = [torch.empty_like(local, device=comm) for _ in range(world_size)]
        dist.all_gather(parts, local.to(comm))
        parts = [p.cpu() for p in parts]
    else:
        parts = [local]
    full = torch.full((q_count, c_count), float("-inf"))
    for r, part in enumerate(parts):
        s, e, _ = _chunk(q_count, r, world_size)
        rows = part[: e - s]
        full[torch.arange(s, e)[:, None], rows[..., 1].long()] = rows[..., 0].float()
    return full


def rerank_scores(model, to_device, emb: Embedded, *, k_i2t: int, k_t2i: int, rank: int = 0, world_size: int = 1,
                  pair_batch_size: int = 64, pair_score: Optional[PairScore] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4: (i2t (N, T), t2i (T, N)) float32 CPU score matrices, -inf outside each query's ITC top k.
    k is clipped to the pool size (k = N scores every pair)."""
    for name, k in (("k_i2t", k_i2t), ("k_t2i", k_t2i), ("pair_batch_size", pair_batch_size)):
        if int(k) < 1:
            raise ValueError(f"rerank_retrieval: {name} must be >= 1, got {k}")
    if not 0 <= rank < max(world_size, 1):
        raise ValueError(f"rerank_retrieval: rank {rank} outside world_size {world_size}")
    _distributed(world_size)   # a missing process group fails here, before any forward
    score = pair_score or itm_pair_score
    i2t = _rerank_direction(model, to_device, emb, True, min(k_i2t, emb.num_texts), rank, world_size,
                            pair_batch_size, score)
    t2i = _rerank_direction(model, to_device, emb, False, min(k_t2i, emb.num_media), rank, world_size,
                            pair_batch_size, score)
    return i2t, t2i


def _best_positions(scores: torch.Tensor, correct: torch.Tensor, tiebreak: Optional[torch.Tensor],
                    rows_per_chunk: int = 512) -> torch.Tensor:
    """(Q,) 0-based position of the best-ranked correct item per query. Order: score descending, then tiebreak
    descending, then lower index (stable sorts); NaN scores rank as -inf. Row chunks bound the sort's memory."""
    out = []
    for s in range(0, scores.shape[0], rows_per_chunk):
        sc = scores[s:s + rows_per_chunk].float().nan_to_num(nan=float("-inf"))
        if tiebreak is None:
            order = sc.argsort(dim=1, descending=True, stable=True)
        else:
            order = tiebreak[s:s + rows_per_chunk].float().argsort(dim=1, descending=True, stable=True)
            order = order.gather(1, sc.gather(1, order).argsort(dim=1, descending=True, stable=True))
        hit = correct[s:s + rows_per_chunk].gather(1, order)
        out.append(hit.int().argmax(1))   # first True
    return torch.cat(out)


def recall_from_scores(i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, txt2media, modality: str = "image", *,
                       i2t_tiebreak: Optional[torch.Tensor] = None, t2i_tiebreak: Optional[torch.Tensor] = None
                       ) -> dict:
    """Recall@1/5/10 both ways (and medr for video) from i2t (N_media, N_texts) and t2i (N_texts, N_media) scores.

    image keys: tr_r* (text retrieval = media->text), ir_r* (text->media), tr_mean, ir_mean, r_mean (mean of
    the six). video keys: v2t_r*, t2v_r*, v2t_medr, t2v_medr, r_mean. *_tiebreak: same-shape matrices that order
    equal scores (the ITC similarities); without them ties go to the lower index."""
    if modality not in ("image", "video"):
        raise ValueError(f"recall_from_scores: modality must be 'image' or 'video', got {modality!r}")
    txt2media = torch.as_tensor(list(txt2media), dtype=torch.long)
    n_media, n_texts = i2t_scores.shape
    if tuple(t2i_scores.shape) != (n_texts, n_media) or txt2media.numel() != n_texts:
        raise ValueError(f"recall_from_scores: shapes i2t {tuple(i2t_scores.shape)}, t2i {tuple(t2i_scores.shape)}, "
                         f"txt2media {txt2media.numel()} do not agree")
    if n_texts and (txt2media.min() < 0 or txt2media.max() >= n_media):
        raise ValueError(f"recall_from_scores: txt2media must lie in [0, {n_media})")
    correct_t2i = txt2media[:, None] == torch.arange(n_media)[None, :]    # (T, N)
    orphans = (~correct_t2i.any(0)).nonzero().flatten()
    if orphans.numel():
        raise ValueError(f"recall_from_scores: media {orphans.tolist()[:10]} have no text")
    pos_i2t = _best_positions(i2t_scores, correct_t2i.T, i2t_tiebreak)
    pos_t2i = _best_positions(t2i_scores, correct_t2i, t2i_tiebreak)
    rec = lambda pos, k: (pos < k).double().mean().item()
    out = {}
    if modality == "image":
        for k in (1, 5, 10):
            out[f"tr_r{k}"], out[f"ir_r{k}"] = rec(pos_i2t, k), rec(pos_t2i, k)
        out["tr_mean"] = sum(out[f"tr_r{k}"] for k in (1, 5, 10)) / 3
        out["ir_mean"] = sum(out[f"ir_r{k}"] for k in (1, 5, 10)) / 3
        out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    else:
        for k in (1, 5, 10):
            out[f"t2v_r{k}"], out[f"v2t_r{k}"] = rec(pos_t2i, k), rec(pos_i2t, k)
        out["t2v_medr"] = float(statistics.median((pos_t2i + 1).tolist()))
        out["v2t_medr"] = float(statistics.median((pos_i2t + 1).tolist()))
        out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10)) / 6
    return out


def metrics_from_embedded(model, to_device, emb: Embedded, txt2media, *, k_i2t: int, k_t2i: int, rank: int = 0,
                          world_size: int = 1, pair_batch_size: int = 64, modality: str = "image",
                          pair_score: Optional[PairScore] = None) -> dict:
    i2t, t2i = rerank_scores(model, to_device, emb, k_i2t=k_i2t, k_t2i=k_t2i, rank=rank, world_size=world_size,
                             pair_batch_size=pair_batch_size, pair_score=pair_score)
    out = recall_from_scores(i2t, t2i, txt2media, modality, i2t_tiebreak=emb.sim, t2i_tiebreak=emb.sim.T)
    out.update(num_media=emb.num_media, num_texts=emb.num_texts, k_i2t=min(k_i2t, emb.num_texts),
               k_t2i=min(k_t2i, emb.num_media))
    return out


def rerank_retrieval(model, to_device, media_batches: Iterable[dict], texts: dict, txt2media, *, k_i2t: int,
                     k_t2i: int, rank: int = 0, world_size: int = 1, text_batch_size: int = 64,
                     pair_batch_size: int = 64, modality: str = "image", pair_score: Optional[PairScore] = None
                     ) -> dict:
    """Re-ranked retrieval metrics (module docstring). media_batches: every media item, on every rank, as batches
    {"pixel_values": uint8 (B, F, 3, H, W), "index": (B) media positions, "valid": (B) bool, False = padding};
    texts: {"input_ids", "attention_mask"} (T, L) int64 CPU; txt2media[t] = the media position text t describes;
    to_device(batch) moves a batch to the model (and normalises uint8 pixels); model: the unwrapped module.
    Returns recall_from_scores' keys plus num_media, num_texts and the k actually used (clipped to the pools)."""
    emb = embed_all(model, to_device, media_batches, texts, text_batch_size=text_batch_size)
    return metrics_from_embedded(model, to_device, emb, txt2media, k_i2t=k_i2t, k_t2i=k_t2i, rank=rank,
                                 world_size=world_size, pair_batch_size=pair_batch_size, modality=modality,
                                 pair_score=pair_score)


class KRow(NamedTuple):
    k: int
    r_mean: float
    seconds: float   # embedding (done once, its time counted in every row) + this k's re-ranking


def k_report(model, to_device, media_batches: Iterable[dict], texts: dict, txt2media, ks: Iterable[int], *,
             rank: int = 0, world_size: int = 1, text_batch_size: int = 64, pair_batch_size: int = 64,
             modality: str = "image", pair_score: Optional[PairScore] = None) -> list[KRow]:
    """For each k (k_i2t = k_t2i = k): (k, r_mean, seconds). The encoders run once; each row's seconds = that
    embedding time + its own re-ranking, i.e. what rerank_retrieval at that k would take. Timing is for a report,
    never a pass/fail criterion."""
    emb = embed_all(model, to_device, media_batches, texts, text_batch_size=text_batch_size)
    rows = []
    for k in ks:
        start = time.perf_counter()
        m = metrics_from_embedded(model, to_device, emb, txt2media, k_i2t=k, k_t2i=k, rank=rank,
                                  world_size=world_size, pair_batch_size=pair_batch_size, modality=modality,
                                  pair_score=pair_score)
        rows.append(KRow(int(k), m["r_mean"], emb.seconds + time.perf_counter() - start))
    return rows


def format_k_report(rows: list[KRow]) -> list[str]:
    lines = [f"{'k':>6}{'r_mean':>10}{'seconds':>10}"]
    lines += [f"{r.k:>6}{r.r_mean:>10.4f}{r.seconds:>10.2f}" for r in rows]
    return lines
