"""train/retrieval_eval.py: ITC top-k re-ranked by a cross-encoder score, against computations made here.

The references below score every (media, text) pair themselves through the model's public encode/fuse/itm_head
calls, and rank with plain Python loops; nothing of train/retrieval_eval.py is used to build them."""
import math
import os

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks, tiny_model_config
from datasets.batch import to_device
from models.backbone import ImageTokens
from train.retrieval_eval import embed_all, recall_from_scores, rerank_retrieval, rerank_scores

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles", "a yellow star above a line",
            "an orange square", "a purple circle moving right", "a small black dot", "three white squares",
            "a large red triangle", "a pink star", "a grey circle below a blue line"]


def to_cpu(batch):
    return to_device(batch, "cpu", torch.float32)


def build(seed: int = 0):
    from models.objectives.itc import ItcConfig
    from models.objectives.itm import ItmConfig
    from models.text import TextConfig, load_tokenizer
    from models.vlp import build_model

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    torch.manual_seed(seed)
    return build_model(tiny_model_config(), {"itc": ItcConfig(), "itm": ItmConfig()}, tok).eval(), tok


def make_data(tok, n_media: int, n_texts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n_media, 1, 3, 32, 32), dtype=torch.uint8, generator=g)
    enc = tok(CAPTIONS[:n_texts], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    texts = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    txt2media = [t % n_media for t in range(n_texts)]
    return pixels, texts, txt2media


def media_batches(pixels, batch_size: int = 4):
    """Batches in a shuffled media order, the last one padded with invalid rows (copies of the first media)."""
    n = pixels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = []
    for s in range(0, n, batch_size):
        idx = perm[s:s + batch_size]
        pad = batch_size - idx.numel()
        out.append({"pixel_values": torch.cat([pixels[idx], pixels[:1].expand(pad, -1, -1, -1, -1)]),
                    "index": torch.cat([idx, torch.full((pad,), 99)]),
                    "valid": torch.cat([torch.ones(idx.numel(), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])})
    return out


@torch.no_grad()
def full_itm_matrix(model, pixels, texts):
    """(N, T) ITM positive logit of every pair, one pair per fusion call."""
    n, t = pixels.shape[0], texts["input_ids"].shape[0]
    out = torch.empty(n, t)
    for m in range(n):
        img = model.encode_image(to_cpu({"pixel_values": pixels[m:m + 1]})["pixel_values"])
        for j in range(t):
            txt = model.encode_text(texts["input_ids"][j:j + 1], texts["attention_mask"][j:j + 1])
            f = model.fuse(txt, texts["attention_mask"][j:j + 1], img, text_out="cls", image_out="cls")
            out[m, j] = model.itm_head(f.cls_feats)[0, 1]
    return out


def ref_ranks(scores, correct_sets):
    """1-based rank of the best correct item of each row; scores are distinct here, so no tie rule is needed."""
    ranks = []
    for row, correct in zip(scores.tolist(), correct_sets):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        ranks.append(min(order.index(j) for j in correct) + 1)
    return ranks


def ref_image_metrics(i2t, txt2media):
    n, t = i2t.shape
    tr = ref_ranks(i2t, [[j for j in range(t) if txt2media[j] == m] for m in range(n)])
    ir = ref_ranks(i2t.T, [[txt2media[j]] for j in range(t)])
    out = {}
    for k in (1, 5, 10):
        out[f"tr_r{k}"] = sum(r <= k for r in tr) / n
        out[f"ir_r{k}"] = sum(r <= k for r in ir) / t
    return out


def test_all_pairs_rescored_equals_the_full_cross_encoder():
    model, tok = build()
    pixels, texts, txt2media = make_data(tok, 6, 11)
    ref = full_itm_matrix(model, pixels, texts)
    assert len(set(ref.flatten().tolist())) == ref.numel()   # distinct scores: the ranking is unambiguous

    metrics = rerank_retrieval(model, to_cpu, media_batches(pixels), texts, txt2media, k_i2t=11, k_t2i=6,
                               pair_batch_size=5, text_batch_size=4)
    want = ref_image_metrics(ref, txt2media)
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < want["tr_r1"] < 1 or 0 < want["ir_r1"] < 1 or 0 < want["ir_r5"] < 1   # not a degenerate case
    assert metrics["r_mean"] == pytest.approx(sum(want.values()) / 6)
    assert (metrics["num_media"], metrics["num_texts"], metrics["k_i2t"], metrics["k_t2i"]) == (6, 11, 11, 6)

    emb = embed_all(model, to_cpu, media_batches(pixels), texts, text_batch_size=4)
    i2t, t2i = rerank_scores(model, to_cpu, emb, k_i2t=11, k_t2i=6, pair_batch_size=5)
    torch.testing.assert_close(i2t, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t2i, ref.T, rtol=1e-4, atol=1e-5)
    assert torch.equal(i2t.argmax(1), ref.argmax(1)) and torch.equal(t2i.argmax(1), ref.T.argmax(1))
    # the ITC similarities from the one vision pass are the model's embed_image / embed_text ones
    with torch.no_grad():
        zi = model.embed_image(to_cpu({"pixel_values": pixels})["pixel_values"])
        zt = model.embed_text(texts["input_ids"], texts["attention_mask"])
    torch.testing.assert_close(emb.sim, zi @ zt.T, rtol=1e-4, atol=1e-5)


def neg_itc_pair_score(model, text, text_mask, image_tokens: ImageTokens):
    """A pair score that inverts the ITC ranking: its favourite is the ITC-least similar item."""
    zi = model.itc(image_global=image_tokens.global_)[0]
    zt = model.itc(text_global=text[:, 0])[1]
    return -(zi * zt).sum(-1)


def test_items_outside_the_itc_top_k_never_rank_first():
    model, tok = build()
    pixels, texts, txt2media = make_data(tok, 5, 9)
    emb = embed_all(model, to_cpu, media_batches(pixels), texts)
    sim = emb.sim
    # k = all: the inverted score puts the ITC-least similar item first
    i2t, t2i = rerank_scores(model, to_cpu, emb, k_i2t=9, k_t2i=5, pair_score=neg_itc_pair_score)
    assert torch.equal(i2t.argmax(1), sim.argmin(1)) and torch.equal(t2i.argmax(1), sim.T.argmin(1))
    # k = 2: only the ITC top 2 are scored; the winner is the second of them, never the global favourite
    k = 2
    i2t, t2i = rerank_scores(model, to_cpu, emb, k_i2t=k, k_t2i=k, pair_score=neg_itc_pair_score)
    for scores, s in ((i2t, sim), (t2i, sim.T)):
        order = s.argsort(1, descending=True)
        assert torch.equal(scores.argmax(1), order[:, k - 1])
        assert not torch.equal(scores.argmax(1), s.argmin(1))
        inside = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order[:, :k], True)
        assert torch.isfinite(scores[inside]).all() and torch.isneginf(scores[~inside]).all()
    # the rest is ranked by ITC similarity (the documented tie rule for the -inf entries): media m's correct
    # texts, ranked [2nd, 1st ITC] then ITC order
    want_tr = []
    for m in range(5):
        order = sim[m].argsort(descending=True).tolist()
        ranking = [order[1], order[0]] + order[2:]
        want_tr.append(min(ranking.index(j) for j in range(9) if txt2media[j] == m) + 1)
    got = rerank_retrieval(model, to_cpu, media_batches(pixels), texts, txt2media, k_i2t=k, k_t2i=k,
                           pair_score=neg_itc_pair_score)
    for kk in (1, 5, 10):
        assert got[f"tr_r{kk}"] == pytest.approx(sum(r <= kk for r in want_tr) / 5), kk
    assert 0 < got["tr_r5"] < 1   # the rule decides hits here


def _worker(rank, port, out_dir, n_media, n_texts, k_i2t, k_t2i, pbs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, tok = build()
        pixels, texts, txt2media = make_data(tok, n_media, n_texts)
        calls = []
        forward = model.fusion.forward
        model.fusion.forward = lambda *a, **kw: (calls.append(1), forward(*a, **kw))[1]
        metrics = rerank_retrieval(model, to_cpu, media_batches(pixels), texts, txt2media, k_i2t=k_i2t,
                                   k_t2i=k_t2i, rank=rank, world_size=2, pair_batch_size=pbs)
        n_calls = len(calls)
        emb = embed_all(model, to_cpu, media_batches(pixels), texts)
        i2t, t2i = rerank_scores(model, to_cpu, emb, k_i2t=k_i2t, k_t2i=k_t2i, rank=rank, world_size=2,
                                 pair_batch_size=pbs)
        torch.save({"metrics": metrics, "calls": n_calls, "i2t": i2t, "t2i": t2i},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_media,n_texts,k_i2t,k_t2i,pbs", [(5, 7, 3, 2, 2)])
def test_two_ranks_match_one_rank(tmp_path, n_media, n_texts, k_i2t, k_t2i, pbs):
    spawn_ranks(_worker, 2, str(tmp_path), n_media, n_texts, k_i2t, k_t2i, pbs)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    model, tok = build()
    pixels, texts, txt2media = make_data(tok, n_media, n_texts)
    calls = []
    forward = model.fusion.forward
    model.fusion.forward = lambda *a, **kw: (calls.append(1), forward(*a, **kw))[1]
    one = rerank_retrieval(model, to_cpu, media_batches(pixels), texts, txt2media, k_i2t=k_i2t, k_t2i=k_t2i,
                           pair_batch_size=pbs)
    del model.fusion.forward
    emb = embed_all(model, to_cpu, media_batches(pixels), texts)
    i2t, t2i = rerank_scores(model, to_cpu, emb, k_i2t=k_i2t, k_t2i=k_t2i, pair_batch_size=pbs)
    for r in range(2):
        assert got[r]["metrics"] == one, r
        # the same entries scored (the rest -inf); values up to float noise (other pairs share a fusion batch)
        torch.testing.assert_close(got[r]["i2t"], i2t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r]["t2i"], t2i, rtol=1e-5, atol=1e-6)
    # uneven split (5 media -> 3 + 2, 7 texts -> 4 + 3), yet the same fusion calls on both ranks, padded
    per_rank = math.ceil(math.ceil(n_media / 2) * k_i2t / pbs) + math.ceil(math.ceil(n_texts / 2) * k_t2i / pbs)
    assert got[0]["calls"] == got[1]["calls"] == per_rank
    assert len(calls) == math.ceil(n_media * k_i2t / pbs) + math.ceil(n_texts * k_t2i / pbs)


def test_recall_from_scores_by_hand():
    # 3 images, 6 captions: image 0 <- texts 0, 1; image 1 <- text 2; image 2 <- texts 3, 4, 5
    txt2media = [0, 0, 1, 2, 2, 2]
    i2t = torch.tensor([[0.1, 0.9, 0.8, 0.3, 0.2, 0.0],     # best correct: text 1, rank 1 (text 0 is 6th)
                        [0.5, 0.4, 0.1, 0.9, 0.7, 0.6],     # text 2 is last: rank 6
                        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])    # text 3: rank 4
    t2i = torch.tensor([[0.2, 0.5, 0.1],    # image 0: rank 2
                        [0.9, 0.1, 0.2],    # 1
                        [0.3, 0.2, 0.1],    # image 1: rank 2
                        [0.1, 0.2, 0.3],    # 1
                        [0.5, 0.6, 0.4],    # 3
                        [0.3, 0.1, 0.2]])   # 2
    m = recall_from_scores(i2t, t2i, txt2media)
    want = {"tr_r1": 1 / 3, "tr_r5": 2 / 3, "tr_r10": 1.0, "ir_r1": 2 / 6, "ir_r5": 1.0, "ir_r10": 1.0,
            "tr_mean": 2 / 3, "ir_mean": 7 / 9, "r_mean": 13 / 18}
    assert m.keys() == want.keys()
    for k, v in want.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k


def test_ties_and_minus_inf_follow_the_tiebreak():
    inf = float("-inf")
    v2t = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                        [0.0, 1.0, 0.0, 0.0],
                        [inf, 0.5, 0.5, inf],     # a tie between texts 1 and 2 (2 is correct)
                        [0.5, inf, inf, inf]])    # correct text 3 is among the -inf entries
    tiebreak = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0],
                             [0.9, 0.1, 0.2, 0.3],   # order 2, 1, then 0, 3: text 2 ranks 1st
                             [0.1, 0.2, 0.3, 0.9]])  # order 0, then 3, 2, 1: text 3 ranks 2nd
    t2v = torch.eye(4)
    with_tb = recall_from_scores(v2t, t2v, [0, 1, 2, 3], "video", i2t_tiebreak=tiebreak)
    assert (with_tb["v2t_r1"], with_tb["v2t_medr"]) == (0.75, 1.0)           # ranks 1, 1, 1, 2
    without = recall_from_scores(v2t, t2v, [0, 1, 2, 3], "video")           # lower index first: 1, 1, 2, 4
    assert (without["v2t_r1"], without["v2t_medr"], without["v2t_r5"]) == (0.5, 1.5, 1.0)
    assert with_tb["t2v_r1"] == without["t2v_r1"] == 1.0


def test_video_medr_by_hand():
    txt2media = [0, 1, 2, 3]
    t2v = torch.tensor([[0.9, 0.1, 0.2, 0.3],    # rank 1
                        [0.5, 0.3, 0.4, 0.1],    # rank 3
                        [0.1, 0.6, 0.5, 0.2],    # rank 2
                        [0.4, 0.3, 0.2, 0.1]])   # rank 4
    v2t = torch.tensor([[0.8, 0.1, 0.2, 0.3],    # rank 1
                        [0.1, 0.7, 0.2, 0.3],    # rank 1
                        [0.1, 0.2, 0.5, 0.6],    # rank 2
                        [0.4, 0.3, 0.2, 0.1]])   # rank 4
    m = recall_from_scores(v2t, t2v, txt2media, "video")
    want = {"t2v_r1": 0.25, "t2v_r5": 1.0, "t2v_r10": 1.0, "v2t_r1": 0.5, "v2t_r5": 1.0, "v2t_r10": 1.0,
            "t2v_medr": 2.5, "v2t_medr": 1.5, "r_mean": 4.75 / 6}
    assert m.keys() == want.keys()
    for k, v in want.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    # an odd count: the middle value
    m = recall_from_scores(v2t[:3, :3], t2v[:3, :3], txt2media[:3], "video")
    assert (m["t2v_medr"], m["v2t_medr"]) == (2.0, 1.0)   # t2v ranks 1, 3, 2; v2t ranks 1, 1, 2


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="media \\[1\\] have no text"):
        recall_from_scores(torch.zeros(2, 2), torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="do not agree"):
        recall_from_scores(torch.zeros(2, 3), torch.zeros(2, 2), [0, 1, 1])
    with pytest.raises(ValueError, match="world_size=2 but (torch.distributed is not initialized|the process group has 1 ranks)"):
        rerank_scores(None, to_cpu, _FakeEmb(), k_i2t=1, k_t2i=1, rank=0, world_size=2)


class _FakeEmb:
    num_media = num_texts = 1
    sim = torch.zeros(1, 1)
