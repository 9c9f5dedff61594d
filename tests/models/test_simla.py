"""SIMLA's objectives (models/objectives/simla.py; ITA and ITM on the single-stream family) against computations
written here from methods.md §2.2 / §6 items 7-8.

Every expected value is recomputed in float64 from the modules' weights with test_single_stream.py's plain-torch
layer loop (`ref_bert`), never with the objectives' helpers: XMM's distilled MLM (tied decoder, momentum logits on the
momentum image tokens), XMM's MIM (fixed blockwise mask, dVAE codes of the tokenizer view, the image tokens as BERT's
query stream with the online caption embeddings in both branches), PSL (keywords from the momentum BERT's last-layer
CLS self-attention, both rules, the alpha ramp) and ITA's queue loss. BEiT's MaskingGenerator is re-implemented here
and must give the same masks as `blockwise_mask` for the same random.Random stream. Tiny model, eval mode (no
dropout), momentum copies perturbed so they differ from the online weights.
"""
import math
import random

import pytest
import torch

import models.objectives.itm as itm_module
from models.backbone import ContrastiveHeadConfig
from models.masking import blockwise_mask
from models.objectives.ita import ItaConfig
from models.objectives.itm import ItmConfig, sample_negatives
from models.objectives.simla import (PslConfig, RandomTokenizerConfig, XmmImageConfig, XmmTextConfig,
                                     keyword_positions)
from models.passes import StepContext
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import ModelConfig, build_model
from test_single_stream import lin, layer_norm, gelu, ref_bert, ref_embed

B, QUEUE, GRID = 4, 8, 4   # 32 px images, 8 px patches: a 4 x 4 grid
CAPTIONS = ["a small red circle left of a large blue square", "a large green triangle", "a blue square",
            "an orange circle"]


def simla_config() -> ModelConfig:
    return ModelConfig(
        family="single_stream",
        vision=VisionConfig(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1,
                            num_heads=2, mask_token=True),
        text=TextConfig(pretrained=None, tokenizer="minilm", hidden_size=64, num_layers=2, num_heads=2,
                        intermediate_size=128, max_position_embeddings=64),
        itc=ContrastiveHeadConfig(embed_dim=16, projection="linear", min_temperature=0.001))


def mim_config(**kw) -> XmmImageConfig:
    return XmmImageConfig(num_masked=5, min_block=2, random_tokenizer=RandomTokenizerConfig(vocab_size=32), **kw)


def full_objectives():
    return {"ita": ItaConfig(queue_size=QUEUE), "itm": ItmConfig(), "xmm_text": XmmTextConfig(),
            "xmm_image": mim_config(), "psl": PslConfig()}


def build(tokenizer, objectives, seed=0):
    torch.manual_seed(seed)
    return build_model(simla_config(), objectives, tokenizer)


def perturb(model, seed=1, scale=0.05):
    """Online weights away from the init and momentum copies away from the online weights (as after EMA steps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        if model.momentum is not None:
            for p in model.momentum.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_batch(tokenizer, captions=CAPTIONS, seed=0, length=14):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(captions, padding="max_length", max_length=length, return_tensors="pt")
    n = len(captions)
    return {"pixel_values": torch.randn(n, 1, 3, 32, 32, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "tokenizer_pixels": torch.rand(n, 3, 32, 32, generator=g)}


def image_tokens(vision, pixels, mask=None):
    """The ViT by hand (float64 after the patch embedding): masked patch embeddings -> mask token, then the
    position embeddings, CLS, the blocks, the final norm."""
    x = vision.patch_embed(pixels[:, 0]).double()
    if mask is not None:
        x = torch.where(mask[..., None], vision.mask_token.double().reshape(1, 1, -1), x)
    pos = vision.pos_embed.double()
    x = torch.cat([(vision.cls_token.double() + pos[:, :1]).expand(x.shape[0], -1, -1), x + pos[:, 1:]], dim=1)
    blocks = vision.blocks.double()
    try:
        for blk in blocks:
            x = blk(x)
        return vision.norm.double()(x)
    finally:
        vision.float()


def log_softmax(x):
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def distilled_ce(logits, target, logits_m, alpha):
    """(1 - a) mean CE(logits, target) + a mean(-sum softmax(logits_m) log softmax(logits)), float64."""
    lp = log_softmax(logits.double())
    ce = -lp[torch.arange(len(target)), target].mean()
    soft = torch.exp(log_softmax(logits_m.double()))
    return (1 - alpha) * ce + alpha * (-(soft * lp).sum(-1).mean())


def bce(z, y):
    """mean of -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))), float64."""
    z, y = z.double(), y.double()
    return (torch.log1p(torch.exp(-z.abs())) + z.clamp(min=0) - y * z).mean()


ALPHAS = [(0, 0.0), (5, 0.2), (None, 0.4), (50, 0.4)]   # (batch "step", alpha) with alpha 0.4 over 10 warmup steps
RAMPED = ALPHAS[1::2]   # mid-ramp and past it: the costlier tests


# ----------------------------------------------------------------------------------------------- XMM, text side
def mlm_inputs(tokenizer, ids):
    """Hand-chosen masking: [MASK] at some positions, a random id at one, an unchanged token at one."""
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    for row, col, new in ((0, 1, tokenizer.mask_token_id), (0, 4, 2000), (0, 7, tokenizer.mask_token_id),
                          (1, 2, None), (2, 3, tokenizer.mask_token_id), (3, 2, tokenizer.mask_token_id)):
        labels[row, col] = ids[row, col]
        if new is not None:
            masked[row, col] = new
    return masked, labels


def lm_head_logits(h, head, word_embeddings):
    t = layer_norm(gelu(lin(h, head.transform.dense)), head.transform.LayerNorm)
    return t @ word_embeddings.double().T + head.decoder.bias.double()


@pytest.mark.parametrize("step,alpha", RAMPED)
def test_xmm_mlm_equals_independent_computation(tokenizer, step, alpha):
    model = perturb(build(tokenizer, {"xmm_text": XmmTextConfig(alpha=0.4, alpha_warmup_steps=10)})).eval()
    b = make_batch(tokenizer)
    masked, labels = mlm_inputs(tokenizer, b["input_ids"])
    out = model({**b, "mlm_input_ids": masked, "mlm_labels": labels, "step": step})
    where = labels != -100
    with torch.no_grad():
        # online: the masked caption through BERT in multimodal mode on the online ViT tokens, the tied head
        h, _ = ref_bert(model.text, ref_embed(model.text, masked), b["attention_mask"],
                        image_tokens(model.vision, b["pixel_values"]))
        logits = lm_head_logits(h[where], model.objectives["xmm_text"].head,
                                model.text.embeddings.word_embeddings.weight)   # the table, not head.decoder
        # momentum: the momentum BERT and head on the momentum ViT's tokens, the same masked caption
        m = model.momentum
        text_m = m.copy_of("text")
        h_m, _ = ref_bert(text_m, ref_embed(text_m, masked), b["attention_mask"],
                          image_tokens(m.copy_of("vision"), b["pixel_values"]))
        logits_m = lm_head_logits(h_m[where], m.copy_of("objectives.xmm_text.head"),
                                  text_m.embeddings.word_embeddings.weight)
    want = distilled_ce(logits, b["input_ids"][where], logits_m, alpha)
    torch.testing.assert_close(out["losses"]["xmm_mlm"].double(), want, rtol=1e-5, atol=1e-5)
    if alpha:   # the momentum side really matters
        assert abs(want - distilled_ce(logits, b["input_ids"][where], logits, alpha)) > 1e-3


def test_xmm_mlm_uses_the_masker_without_batch_masking(tokenizer, monkeypatch):
    model = perturb(build(tokenizer, {"xmm_text": XmmTextConfig()})).eval()
    b = make_batch(tokenizer)
    masked, labels = mlm_inputs(tokenizer, b["input_ids"])
    seen = []

    def masker(ids, mask):
        seen.append((ids, mask))
        return masked, labels

    monkeypatch.setattr(model.objectives["xmm_text"], "masker", masker)
    got = model(b)["losses"]["xmm_mlm"]
    assert torch.equal(seen[0][0], b["input_ids"]) and torch.equal(seen[0][1], b["attention_mask"])
    monkeypatch.undo()
    want = model({**b, "mlm_input_ids": masked, "mlm_labels": labels})["losses"]["xmm_mlm"]
    assert torch.equal(got, want)


def test_the_mlm_decoder_is_the_word_embedding_table(tokenizer):
    model = build(tokenizer, {"xmm_text": XmmTextConfig()})
    head, words = model.objectives["xmm_text"].head, model.text.embeddings.word_embeddings
    assert head.decoder.weight is words.weight
    m = model.momentum
    assert m.copy_of("objectives.xmm_text.head").decoder.weight is m.copy_of("text").embeddings.word_embeddings.weight
    assert sum(p is words.weight for p in model.parameters()) == 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = words.weight.detach().clone()
    b = make_batch(tokenizer)
    masked, labels = mlm_inputs(tokenizer, b["input_ids"])
    model({**b, "mlm_input_ids": masked, "mlm_labels": labels})["loss"].backward()
    unused = 5000   # an id in no caption: its row's gradient can only come through the decoder
    assert unused not in masked and words.weight.grad[unused].abs().sum() > 0
    opt.step()
    assert head.decoder.weight is words.weight and not torch.equal(words.weight, before)
    sd = model.state_dict()
    assert torch.equal(sd["objectives.xmm_text.head.decoder.weight"], sd["text.embeddings.word_embeddings.weight"])
    untied = build(tokenizer, {"xmm_text": XmmTextConfig(tie_decoder=False)})
    assert untied.objectives["xmm_text"].head.decoder.weight is not untied.text.embeddings.word_embeddings.weight


# ---------------------------------------------------------------------------------------------- XMM, image side
MIM_MASK = torch.zeros(B, GRID * GRID, dtype=torch.bool)
for _row, _cols in enumerate(([0, 1, 4, 5, 6], [10, 11, 14, 15], [3, 7, 11], [5, 6, 9, 10, 12])):
    MIM_MASK[_row, _cols] = True


@pytest.mark.parametrize("step,alpha", RAMPED)
def test_xmm_mim_equals_independent_computation(tokenizer, monkeypatch, step, alpha):
    model = perturb(build(tokenizer, {"xmm_image": mim_config(alpha=0.4, alpha_warmup_steps=10)})).eval()
    obj = model.objectives["xmm_image"]
    monkeypatch.setattr(obj, "masks", lambda batch, device: MIM_MASK.clone())
    b = make_batch(tokenizer)
    out = model({**b, "step": step})
    m = MIM_MASK
    with torch.no_grad():
        # targets: the dVAE's codes of the tokenizer view (pixels in [0, 1] squeezed into [0.1, 0.9]), row-major
        codes = obj.dvae(0.8 * b["tokenizer_pixels"] + 0.1).argmax(1).flatten(1)
        assert codes.shape == (B, 16) and codes[m].unique().numel() > 3
        caption = ref_embed(model.text, b["input_ids"])   # online, non-contextualised: both branches read it
        z = image_tokens(model.vision, b["pixel_values"], m)
        h, _ = ref_bert(model.text, ref_embed(model.text, embeds=z), None, caption, b["attention_mask"])
        logits = lin(h[:, 1:][m], obj.head)
        mom = model.momentum
        vision_m, text_m = mom.copy_of("vision"), mom.copy_of("text")
        z_m = image_tokens(vision_m, b["pixel_values"], m)
        h_m, _ = ref_bert(text_m, ref_embed(text_m, embeds=z_m), None, caption, b["attention_mask"])
        logits_m = lin(h_m[:, 1:][m], mom.copy_of("objectives.xmm_image.head"))
    want = distilled_ce(logits, codes[m], logits_m, alpha)
    torch.testing.assert_close(out["losses"]["xmm_mim"].double(), want, rtol=1e-5, atol=1e-5)
    assert out["stats"]["xmm_mim_masked"].item() == pytest.approx(m.sum(1).double().mean().item())
    if alpha:   # the momentum branch's caption must be the ONLINE embedding table's (they differ here)
        with torch.no_grad():
            h_wrong, _ = ref_bert(text_m, ref_embed(text_m, embeds=z_m), None, ref_embed(text_m, b["input_ids"]),
                                  b["attention_mask"])
            wrong = distilled_ce(logits, codes[m], lin(h_wrong[:, 1:][m], mom.copy_of("objectives.xmm_image.head")),
                                 alpha)
        assert abs(wrong - want) > 1e-4


def test_mim_masks_are_fresh_per_sample_and_follow_torch_seed(tokenizer):
    model = build(tokenizer, {"xmm_image": mim_config()})
    obj = model.objectives["xmm_image"]
    torch.manual_seed(7)
    a = obj.masks(16, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(a, obj.masks(16, torch.device("cpu")))
    assert a.shape == (16, 16) and a.dtype == torch.bool
    assert (a.sum(1) <= 5).all() and len({tuple(r.tolist()) for r in a}) > 4
    assert not torch.equal(a, obj.masks(16, torch.device("cpu")))   # a new draw next time


# ------------------------------------------------------------------------------------------- blockwise masking
class BeitMaskingGenerator:
    """BEiT's MaskingGenerator (microsoft/unilm beit/masking_generator.py) written out on a list grid, with its
    module-level `random` replaced by `rng`; records every block it fills."""

    def __init__(self, height, width, num_masking_patches, min_num_patches, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None):
        self.height, self.width = height, width
        self.num_masking_patches, self.min_num_patches = num_masking_patches, min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, rng, mask, max_mask_patches, blocks):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    blocks.append((top, left, h, w, target_area, aspect_ratio, max_mask_patches))
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, rng):
        mask = [[0] * self.width for _ in range(self.height)]
        blocks, count = [], 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask(rng, mask, max_mask_patches, blocks)
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask, dtype=torch.bool).flatten(), blocks


@pytest.mark.parametrize("height,width,num,min_block,max_block,min_aspect,draws", [
    (16, 16, 75, 16, None, 0.3, 400),     # SIMLA
    (4, 4, 5, 2, None, 0.3, 300),         # the CPU demo
    (14, 14, 75, 16, None, 0.3, 200),     # BEiT's 224 px grid
    (8, 12, 30, 4, 10, 0.5, 200),         # non-square, a max block, a narrower aspect range
])
def test_blockwise_mask_is_beit_masking_for_the_same_rng_stream(height, width, num, min_block, max_block, min_aspect,
                                                                draws):
    ref = BeitMaskingGenerator(height, width, num, min_block, max_block, min_aspect)
    max_aspect = 1 / min_aspect
    for seed in range(draws):
        ours_rng, ref_rng = random.Random(seed), random.Random(seed)
        got = blockwise_mask(height, width, num, min_block, ours_rng, max_block, min_aspect)
        want, blocks = ref(ref_rng)
        assert torch.equal(got, want), seed
        assert ours_rng.getstate() == ref_rng.getstate(), seed   # the same number of draws
        for top, left, h, w, area, aspect, room in blocks:   # the blocks of the (identical) mask
            assert h < height and w < width   # no block spans a whole column or row
            assert min(min_block, room) <= area <= max(min_block, room)
            assert min_aspect <= aspect <= max_aspect * (1 + 1e-12)
            assert h == round(math.sqrt(area * aspect)) and w == round(math.sqrt(area / aspect))
            assert (h - 0.5) / (w + 0.5) <= max_aspect and (h + 0.5) / (w - 0.5 + 1e-9) >= min_aspect


class RecordingRandom(random.Random):
    def __init__(self, seed):
        super().__init__(seed)
        self.calls = []

    def uniform(self, a, b):
        v = super().uniform(a, b)
        self.calls.append(("uniform", a, b, v))
        return v

    def randint(self, a, b):
        v = super().randint(a, b)
        self.calls.append(("randint", a, b, v))
        return v


def test_blockwise_mask_statistics_in_simla_setting():
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    counts, rows = [], set()
    for seed in range(600):
        rng = RecordingRandom(seed)
        mask = blockwise_mask(16, 16, 75, 16, rng)
        counts.append(int(mask.sum()))
        rows.add(tuple(mask.tolist()))
        calls, i = rng.calls, 0
        while i < len(calls):   # area draw, aspect draw, then top/left only for a block that fits strictly
            (k1, a1, b1, area), (k2, a2, b2, log_aspect) = calls[i], calls[i + 1]
            assert k1 == k2 == "uniform" and a1 == 16 and 0 < b1 <= 75 and (a2, b2) == (lo, hi)
            h = round(math.sqrt(area * math.exp(log_aspect)))
            w = round(math.sqrt(area / math.exp(log_aspect)))
            i += 2
            if i < len(calls) and calls[i][0] == "randint":
                (_, t0, t1, _), (_, l0, l1, _) = calls[i], calls[i + 1]
                assert (t0, t1, l0, l1) == (0, 16 - h, 0, 16 - w) and h < 16 and w < 16
                i += 2
            else:
                assert h >= 16 or w >= 16
    # BEiT's rule stops after a round of 10 tries adds nothing, so it may end short: in this setting it (and the
    # re-implementation above, mask for mask) masks exactly 75 in ~62% of draws, 74 in ~25%, mean ~74.3
    n = len(counts)
    assert max(counts) <= 75
    assert sum(c == 75 for c in counts) >= 0.55 * n and sum(c >= 74 for c in counts) >= 0.8 * n
    assert sum(counts) / n >= 73.5 and min(counts) >= 60
    assert len(rows) >= 0.98 * n   # hardly two draws alike (one big block has few shapes and places: 2 of 600)
    # one rng, many samples (as XmmImage.masks draws a batch): different masks per sample, reproducible by seed
    rng_a, rng_b = random.Random(3), random.Random(3)
    batch_a = [blockwise_mask(16, 16, 75, 16, rng_a) for _ in range(8)]
    batch_b = [blockwise_mask(16, 16, 75, 16, rng_b) for _ in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))
    assert len({tuple(x.tolist()) for x in batch_a}) == 8


# ------------------------------------------------------------------------------------------------------------ PSL
def ours_rule(attention, valid, per_head, keywords):
    """Pure Python: each head votes for its `per_head` most attended valid positions (ties: earlier position); the
    `keywords` most voted positions with a vote (ties: earlier position), in that order."""
    out = []
    for a_row, v_row in zip(attention.tolist(), valid.tolist()):
        votes = {}
        for head in a_row:
            cand = sorted((p for p in range(len(head)) if v_row[p]), key=lambda p: (-head[p], p))[:per_head]
            for p in cand:
                votes[p] = votes.get(p, 0) + 1
        out.append(sorted(votes, key=lambda p: (-votes[p], p))[:keywords])
    return out


def check_ours(attention, valid, per_head, keywords):
    pos, chosen = keyword_positions(attention, valid, per_head, keywords, "ours")
    want = ours_rule(attention, valid, per_head, keywords)
    assert pos.shape == chosen.shape == (attention.shape[0], min(keywords, attention.shape[-1]))
    for i, w in enumerate(want):
        assert pos[i][chosen[i]].tolist() == w, (i, pos[i].tolist(), chosen[i].tolist(), w)
        assert chosen[i].tolist() == [True] * len(w) + [False] * (pos.shape[1] - len(w))


def test_keyword_positions_ours_by_hand_with_ties():
    # positions: 0 [CLS], 1-5 words, 6 [SEP], 7 padding; per head 2 votes, 3 keywords
    valid = torch.tensor([[False, True, True, True, True, True, False, False]])
    attention = torch.tensor([[[0.9, 0.2, 0.2, 0.2, 0.1, 0.1, 0.5, 0.9],     # ties at 1, 2, 3: votes 1, 2
                               [0.9, 0.1, 0.0, 0.4, 0.4, 0.4, 0.5, 0.9]]])   # ties at 3, 4, 5: votes 3, 4
    pos, chosen = keyword_positions(attention, valid, 2, 3, "ours")
    assert pos.tolist() == [[1, 2, 3]] and chosen.all()   # 4 votes of 1 each: the earliest three
    attention[0, 1, 2] = 0.4   # head 1 now ties 2, 3, 4, 5: votes 2, 3 -> 2 has two votes, 1 and 3 one each
    pos, chosen = keyword_positions(attention, valid, 2, 3, "ours")
    assert pos.tolist() == [[2, 1, 3]] and chosen.all()


def test_keyword_positions_ours_short_captions_and_specials():
    # a caption with 2 words (positions 1, 2): fewer than per_head and than keywords; only they are chosen
    valid = torch.tensor([[False, True, True, False, False, False]])
    attention = torch.tensor([[[0.5, 0.1, 0.2, 0.2, 0.0, 0.0]] * 3])
    pos, chosen = keyword_positions(attention, valid, 4, 5, "ours")
    assert pos[chosen].tolist() == [1, 2] and chosen.sum() == 2   # 3 votes each: the earlier first
    nothing = keyword_positions(attention, torch.zeros_like(valid), 4, 5, "ours")[1]
    assert not nothing.any()   # an empty caption: no keyword


def test_keyword_positions_ours_against_the_python_rule_on_random_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        b, heads, length = 3, int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        attention = torch.randint(0, 4, (b, heads, length), generator=g).float() / 4   # many ties
        valid = torch.rand(b, length, generator=g) < 0.6
        per_head, keywords = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        check_ours(attention, valid, per_head, keywords)


def official_literal(attention, input_ids, per_head, keywords, vocab, cls_id):
    """SIMLA's code as methods.md §2.2-5 spells it."""
    b, _, length = attention.shape
    top = attention.reshape(-1, length).topk(per_head).indices.reshape(b, -1)
    counts = torch.zeros(b, length).scatter_add(1, top, torch.ones(top.shape))
    pos5 = counts.topk(keywords).indices
    y = torch.zeros(b, vocab)
    y.scatter_(1, input_ids.gather(1, pos5), 1.0)
    y[:, cls_id] = 0
    return pos5, y


def test_keyword_positions_official_is_the_literal_topk_rule():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        attention = torch.rand(2, 3, 9, generator=g)
        attention[:, :, 5:] = 0   # padding: zero attention, as after the masked softmax
        pos, chosen = keyword_positions(attention, torch.ones(2, 9, dtype=torch.bool), 4, 5, "official")
        assert torch.equal(pos, official_literal(attention, torch.zeros(2, 9, dtype=torch.long), 4, 5, 10, 0)[0])
        assert chosen.all()
    # 4 real positions and 4 votes per head: the 5th keyword is a zero-vote position, padding here
    attention = torch.tensor([[[0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0]] * 2])
    pos, chosen = keyword_positions(attention, torch.ones(1, 7, dtype=torch.bool), 4, 5, "official")
    assert set(pos[0, :4].tolist()) == {0, 1, 2, 3} and pos[0, 4] >= 4 and chosen.all()


def fake_last_self(monkeypatch, model, attention, calls):
    """The momentum BERT's forward replaced: returns `attention` (B, heads, L) as the last layer's CLS row."""
    text_m = model.momentum.copy_of("text")

    def forward(x, mask, context=None, context_mask=None, return_cross=False, return_last_self=False,
                last_queries=None):
        calls.append((mask, context, return_last_self))
        from models.single_stream import StreamOutput
        return StreamOutput(torch.zeros(x.shape[0], 1, x.shape[-1]), attention[:, :, None, :], [])

    monkeypatch.setattr(text_m, "forward", forward)


@pytest.mark.parametrize("rule", ["ours", "official"])
def test_psl_keywords_multi_hot(tokenizer, monkeypatch, rule):
    # per_head 1 with 2 heads: only 2 voted positions; "dog" repeats at an unvoted position
    model = build(tokenizer, {"psl": PslConfig(per_head=1, keywords=5, rule=rule)}).eval()
    captions = ["a dog and a dog", "red"]
    b = make_batch(tokenizer, captions, length=9)
    ids, mask = b["input_ids"], b["attention_mask"]
    tok = tokenizer.convert_tokens_to_ids
    assert ids[0, :7].tolist() == [tokenizer.cls_token_id, tok("a"), tok("dog"), tok("and"), tok("a"), tok("dog"),
                                   tokenizer.sep_token_id] and ids[0, 7:].eq(tokenizer.pad_token_id).all()
    attention = torch.full((2, 2, 9), 0.01)
    attention[:, :, 0] = 0.5                      # [CLS] is the most attended (never a keyword in "ours")
    attention[0, 0, 5], attention[0, 1, 3] = 0.3, 0.2   # votes: the second "dog" and "and"
    attention[1, :, 1] = 0.3                      # "red"
    calls = []
    fake_last_self(monkeypatch, model, attention, calls)
    ctx = StepContext(model, b)
    y = model.objectives["psl"].keywords(model, ctx)
    assert torch.equal(calls[0][0], mask) and calls[0][2]
    torch.testing.assert_close(calls[0][1], model.vision(b["pixel_values"]).tokens)   # the ONLINE image tokens
    assert y.shape == (2, tokenizer.vocab_size)
    if rule == "ours":
        want = torch.zeros_like(y)
        want[0, [tok("dog"), tok("and")]] = 1
        want[1, tok("red")] = 1
        assert torch.equal(y, want)
    else:
        _, want = official_literal(attention, ids, 1, 5, y.shape[1], tokenizer.cls_token_id)
        assert torch.equal(y, want) and y[:, tokenizer.cls_token_id].eq(0).all()


@pytest.mark.parametrize("step,alpha", ALPHAS)
def test_psl_loss_equals_independent_computation(tokenizer, monkeypatch, step, alpha):
    cfg = PslConfig(alpha=0.4, alpha_warmup_steps=10, per_head=2, keywords=3)
    model = perturb(build(tokenizer, {"psl": cfg}), scale=0.5).eval()   # image tokens that sway the votes
    b = make_batch(tokenizer)
    ids, mask = b["input_ids"], b["attention_mask"]
    # one keyword more or less moves the mean over B x vocab entries by ~1e-6: the hard targets are checked too
    obj, seen = model.objectives["psl"], []
    real_keywords = obj.keywords
    monkeypatch.setattr(obj, "keywords", lambda model, ctx: seen.append(real_keywords(model, ctx)) or seen[-1])
    out = model({**b, "step": step})
    m = model.momentum
    with torch.no_grad():
        tokens = image_tokens(model.vision, b["pixel_values"])
        # hard keywords: the momentum BERT in multimodal mode on the ONLINE image tokens, last layer, CLS row
        _, probs = ref_bert(m.copy_of("text"), ref_embed(m.copy_of("text"), ids), mask, tokens)
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        valid = mask.bool() & ~torch.isin(ids, special)
        hard = torch.zeros(B, tokenizer.vocab_size, dtype=torch.float64)
        for i, positions in enumerate(ours_rule(probs[:, :, 0], valid, cfg.per_head, cfg.keywords)):
            hard[i, ids[i, positions]] = 1
        assert (hard.sum(1) >= 2).all()
        # the votes depend on which image tokens the momentum BERT attends to (so the test tells them apart)
        _, probs_m = ref_bert(m.copy_of("text"), ref_embed(m.copy_of("text"), ids), mask,
                              image_tokens(m.copy_of("vision"), b["pixel_values"]))
        assert [set(ids[i, p].tolist()) for i, p in enumerate(ours_rule(probs_m[:, :, 0], valid, 2, 3))] != \
            [set(ids[i, p].tolist()) for i, p in enumerate(ours_rule(probs[:, :, 0], valid, 2, 3))]
        # soft keywords: sigmoid(momentum concept head(momentum image embedding)); the prediction from the online one
        v = torch.nn.functional.normalize(lin(tokens[:, 0], model.itc.image_proj), dim=-1)
        v_m = torch.nn.functional.normalize(lin(image_tokens(m.copy_of("vision"), b["pixel_values"])[:, 0],
                                                m.copy_of("itc").image_proj), dim=-1)
        soft = torch.sigmoid(lin(v_m, m.copy_of("objectives.psl.concept_head")))
        z = lin(v, model.objectives["psl"].concept_head)
    assert torch.equal(seen[0].double(), hard)
    want = (1 - alpha) * bce(z, hard) + alpha * bce(z, soft)
    torch.testing.assert_close(out["losses"]["psl"].double(), want, rtol=1e-5, atol=1e-7)
    assert out["stats"]["psl_keywords"].item() == pytest.approx(hard.sum(1).mean().item())


# ------------------------------------------------------------------------------------------------- ITA and ITM
@pytest.mark.parametrize("step,alpha", ALPHAS)
def test_ita_on_the_single_stream_model(tokenizer, step, alpha):
    model = perturb(build(tokenizer, {"ita": ItaConfig(queue_size=QUEUE, alpha=0.4, alpha_warmup_steps=10)})).eval()
    ita = model.objectives["ita"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for q in (ita.image_queue, ita.text_queue):
            q.features.copy_(torch.nn.functional.normalize(torch.randn(QUEUE, 16, generator=g), dim=-1))
    q_img, q_txt = ita.image_queue.features.double().clone(), ita.text_queue.features.double().clone()
    b = make_batch(tokenizer)
    ids, mask = b["input_ids"], b["attention_mask"]
    out = model({**b, "step": step})
    m = model.momentum

    def embeddings(vision, text, itc):   # v: the ViT CLS -> linear; t: BERT's text-mode CLS -> linear
        v = lin(image_tokens(vision, b["pixel_values"])[:, 0], itc.image_proj)
        t = lin(ref_bert(text, ref_embed(text, ids), mask)[0][:, 0], itc.text_proj)
        return v / v.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        v, t = embeddings(model.vision, model.text, model.itc)
        v_m, t_m = embeddings(m.copy_of("vision"), m.copy_of("text"), m.copy_of("itc"))
        tau = 1 / min(max(math.exp(model.itc.log_inv_temperature.item()), 1 / 0.5), 1 / 0.001)
    loss = 0.0
    for rows, rows_m, cols in ((v, v_m, torch.cat([t_m, q_txt])), (t, t_m, torch.cat([v_m, q_img]))):
        s, s_m = rows @ cols.T / tau, rows_m @ cols.T / tau
        target = alpha * torch.exp(log_softmax(s_m)) + (1 - alpha) * torch.eye(B, B + QUEUE, dtype=torch.float64)
        loss = loss - (target * log_softmax(s)).sum(1).mean() / 2
    torch.testing.assert_close(out["losses"]["ita"].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ita.image_queue.features[:B].double(), v_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ita.text_queue.features[:B].double(), t_m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["equal", "nan"])
def test_itm_draws_negatives_from_degenerate_similarities(tokenizer, monkeypatch, kind):
    model = build(tokenizer, {"ita": ItaConfig(queue_size=QUEUE), "itm": ItmConfig()}).eval()
    with torch.no_grad():
        for proj in (model.itc.image_proj, model.itc.text_proj):
            if kind == "nan":
                proj.weight.fill_(float("nan"))
            else:   # every embedding 0: every similarity equal
                proj.weight.zero_()
                proj.bias.zero_()
    drawn = []
    real = itm_module.sample_negatives
    monkeypatch.setattr(itm_module, "sample_negatives",
                        lambda sim, forbidden: drawn.append((sim, forbidden, real(sim, forbidden))) or drawn[-1][2])
    for captions in (CAPTIONS, [CAPTIONS[0]] * 3 + [CAPTIONS[1]], [CAPTIONS[0]] * 4):
        drawn.clear()
        out = model(make_batch(tokenizer, captions))
        assert torch.isfinite(out["losses"]["itm"])
        assert len(drawn) == 2
        for sim, forbidden, neg in drawn:
            assert kind != "nan" or torch.isnan(sim).all()
            assert kind != "equal" or (sim == sim[0, 0]).all()
            rows = torch.arange(len(neg))
            assert (neg != rows).all()   # never the sample itself
            ok = ~forbidden[rows, neg]
            assert ok[forbidden.sum(1) < len(neg)].all()   # never an identical caption while another exists


def test_sample_negatives_on_degenerate_rows():
    forbidden = torch.eye(4, dtype=torch.bool)
    forbidden[0, 1] = forbidden[1, 0] = True
    for sim in (torch.zeros(4, 4), torch.full((4, 4), float("nan")), torch.full((4, 4), float("inf")),
                torch.full((4, 4), -float("inf")), torch.tensor([[1e30, -1e30, 0, 0]] * 4)):
        torch.manual_seed(0)
        seen = torch.stack([sample_negatives(sim, forbidden) for _ in range(40)])
        assert not forbidden[torch.arange(4), seen].any()
        if torch.isnan(sim).all() or (sim == 0).all():   # uniform over the allowed columns
            for i in range(4):
                assert set(seen[:, i].tolist()) == set((~forbidden[i]).nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------------------------ momentum
def test_momentum_modules_of_a_full_simla_model(tokenizer):
    model = build(tokenizer, full_objectives())
    m = model.momentum
    assert sorted(m.names) == sorted(["vision", "text", "itc", "objectives.xmm_text.head",
                                      "objectives.xmm_image.head", "objectives.psl.concept_head"])
    assert len(set(m.names)) == len(m.names) and m.coefficient == 0.995
    pairs = m.pairs(model)
    names = [n for n, _, _ in pairs]
    assert names.count("text.embeddings.word_embeddings.weight") == 1
    assert "objectives.xmm_text.head.decoder.weight" not in names
    assert "objectives.xmm_text.head.decoder.bias" in names
    online = {id(p) for n in m.names for p in model.get_submodule(n).parameters()}
    assert len(pairs) == len(online) == len({id(p) for _, p, _ in pairs}) == len({id(q) for _, _, q in pairs})
    assert {id(p) for _, p, _ in pairs} == online
    # the dVAE is no submodule: never saved, trained or averaged
    assert not any("dvae" in k for k in model.state_dict())
    # one EMA pass over the pairs moves the tied table exactly once
    perturb(model)
    words_m = m.copy_of("text").embeddings.word_embeddings.weight
    assert m.copy_of("objectives.xmm_text.head").decoder.weight is words_m
    old = words_m.clone()
    with torch.no_grad():
        for _, p, q in pairs:
            q.mul_(0.995).add_(p, alpha=0.005)
    torch.testing.assert_close(words_m, 0.995 * old + 0.005 * model.text.embeddings.word_embeddings.weight)
    assert m.copy_of("objectives.xmm_text.head").decoder.weight is words_m


def test_full_simla_model_trains_online_weights_only(tokenizer):
    model = build(tokenizer, full_objectives())
    out = model(make_batch(tokenizer))
    assert set(out["losses"]) == {"ita", "itm", "xmm_mlm", "xmm_mim", "psl"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    out["loss"].backward()
    assert all(p.grad is None for p in model.momentum.parameters())
    for name in ("vision.mask_token", "objectives.xmm_image.head.weight", "objectives.psl.concept_head.weight",
                 "text.layers.0.crossattention.self.key.weight", "itc.log_inv_temperature"):
        assert model.get_parameter(name).grad is not None, name
