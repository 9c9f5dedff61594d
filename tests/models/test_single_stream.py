"""SIMLA's single-stream BERT (models/single_stream.py) against computations written here.

Text mode is compared with transformers' own BertModel on the real MiniLM weights (its token-type table zeroed:
ours has none). The multimodal mode and the MIM query stream are compared with a plain-torch, float64 post-LN layer
loop (self-attention -> cross-attention -> FFN, each followed by add & LayerNorm) that reads the module's weights by
name; `ref_bert` and friends are also used by test_simla.py.
"""
import math

import pytest
import torch

from models.backbone import ContrastiveHeadConfig, VLPBackbone
from models.single_stream import SingleStreamBert
from models.text import TextConfig, resolve_path
from models.vision import VisionConfig
from models.vlp import ModelConfig

D, HEADS, CONTEXT = 64, 2, 40
CAPTIONS = ["a small red circle left of a large blue square", "a large green triangle", "an orange circle"]


# ------------------------------------------------------------------------------------- the reference, float64
def lin(x, mod):
    return x @ mod.weight.to(x.dtype).T + mod.bias.to(x.dtype)


def layer_norm(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight.to(x.dtype) + mod.bias.to(x.dtype)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(xq, xkv, key_mask, block, heads):
    """One transformers-BERT attention sublayer (`attention` / `crossattention`): -> (LN(xq + out), probs)."""
    p = block.self
    q, k, v = lin(xq, p.query), lin(xkv, p.key), lin(xkv, p.value)
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (z.reshape(b, z.shape[1], heads, hd).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, lq, d)
    return layer_norm(xq + lin(out, block.output.dense), block.output.LayerNorm), probs


def ref_layer(layer, x, mask, context, context_mask, heads):
    h, probs = attention(x, x, mask, layer.attention, heads)
    if context is not None:
        h, _ = attention(h, context, context_mask, layer.crossattention, heads)
    ffn = lin(gelu(lin(h, layer.intermediate.dense)), layer.output.dense)
    return layer_norm(h + ffn, layer.output.LayerNorm), probs


def ref_embed(bert, ids=None, embeds=None):
    """word (or given) embeddings + position embeddings 0..n-1 -> LayerNorm, float64."""
    e = bert.embeddings
    x = e.word_embeddings.weight.double()[ids] if embeds is None else embeds.double()
    return layer_norm(x + e.position_embeddings.weight.double()[: x.shape[1]], e.LayerNorm)


def ref_bert(bert, x, mask, context=None, context_mask=None):
    """-> (hidden (B, L, D), last layer's self-attention probabilities (B, heads, L, L)), float64."""
    heads = bert.layers[0].attention.num_heads
    context = None if context is None else context.double()
    probs = None
    for layer in bert.layers:
        x, probs = ref_layer(layer, x.double(), mask, context, context_mask, heads)
    return x, probs


# --------------------------------------------------------------------------------------------------- helpers
def tiny_text(**kw) -> TextConfig:
    return TextConfig(pretrained=None, tokenizer="minilm", hidden_size=D, num_layers=2, num_heads=HEADS,
                      intermediate_size=128, max_position_embeddings=64, **kw)


def scramble(module, seed=0, scale=0.15):
    """Weights far from the N(0, 0.02) init, so a wrong wiring changes the outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if n.endswith("LayerNorm.weight") else scale * noise)
    return module


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return scramble(SingleStreamBert(tiny_text(), CONTEXT)).eval()


def text_batch(tokenizer, n=3):
    enc = tokenizer(CAPTIONS[:n], padding="max_length", max_length=14, return_tensors="pt")
    assert not enc["attention_mask"].all()   # padding present
    return enc["input_ids"], enc["attention_mask"]


def image_context(b=3, n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, n, CONTEXT, generator=g)
    cmask = torch.ones(b, n, dtype=torch.long)
    cmask[1, 6:] = 0   # some context keys masked
    return ctx, cmask


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------------- tests
def test_text_mode_equals_transformers_bert(tokenizer):
    from transformers import AutoModel

    torch.manual_seed(0)
    ours = SingleStreamBert(TextConfig(pretrained="minilm"), 384).eval()
    hf = AutoModel.from_pretrained(resolve_path("minilm"), local_files_only=True).eval()
    with torch.no_grad():
        hf.embeddings.token_type_embeddings.weight.zero_()
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encode(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=2e-5)


def test_loading_a_bert_drops_only_token_types_and_keeps_crossattention_at_init():
    from transformers import AutoModel

    torch.manual_seed(3)
    loaded = SingleStreamBert(TextConfig(pretrained="minilm"), 384)
    assert loaded.dropped == ["embeddings.token_type_embeddings.weight"]
    # the same module, randomly initialised from the same seed: the cross-attention must be untouched by the load
    torch.manual_seed(3)
    twin = SingleStreamBert(TextConfig(pretrained=None, tokenizer="minilm", hidden_size=384, num_layers=6,
                                       num_heads=12, intermediate_size=1536, vocab_size=30522,
                                       max_position_embeddings=512), 384)
    hf = AutoModel.from_pretrained(resolve_path("minilm"), local_files_only=True).state_dict()
    theirs = {}
    for k, v in hf.items():   # transformers' names -> ours, written out here
        if k.startswith("encoder.layer."):
            theirs["layers." + k[len("encoder.layer."):]] = v
        elif k.startswith("embeddings.") and "token_type" not in k and "position_ids" not in k:
            theirs[k] = v
    ours, init = loaded.state_dict(), twin.state_dict()
    cross = {k for k in ours if ".crossattention." in k}
    assert len(cross) == 6 * 10   # q, k, v, output dense, output LayerNorm: weight + bias each, per layer
    assert set(ours) == set(theirs) | cross
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    for k in cross:
        assert torch.equal(ours[k], init[k]), k
    w = ours["layers.0.crossattention.self.key.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and not ours["layers.0.crossattention.self.key.bias"].any()


@pytest.mark.parametrize("with_context", [True, False])
def test_multimodal_and_text_mode_equal_the_layer_loop(bert, tokenizer, with_context):
    ids, mask = text_batch(tokenizer)
    ctx, cmask = image_context() if with_context else (None, None)
    with torch.no_grad():
        got = bert(bert.embed(ids), mask, ctx, cmask)
    want, _ = ref_bert(bert, ref_embed(bert, ids), mask, ctx, cmask)
    close(got.hidden, want)
    if with_context:   # the context (and its mask) matter
        with torch.no_grad():
            other = bert(bert.embed(ids), mask, ctx, torch.ones_like(cmask)).hidden
        assert not torch.allclose(other[1], got.hidden[1], atol=1e-3)
        assert torch.allclose(other[0], got.hidden[0])
    else:   # text mode never touches the cross-attention weights
        with torch.no_grad():
            for layer in bert.layers:
                layer.crossattention.self.query.weight.add_(1.0)
            assert torch.equal(bert(bert.embed(ids), mask).hidden, got.hidden)


def test_cross_attentions_are_returned_per_layer(bert, tokenizer):
    ids, mask = text_batch(tokenizer)
    ctx, cmask = image_context()
    with torch.no_grad():
        out = bert(bert.embed(ids), mask, ctx, cmask, return_cross=True)
    assert len(out.cross_attentions) == 2
    # the last layer's cross-attention, recomputed from the reference's input to it
    x = ref_embed(bert, ids)
    h, _ = ref_layer(bert.layers[0], x, mask, ctx.double(), cmask, HEADS)
    h, _ = attention(h, h, mask, bert.layers[1].attention, HEADS)
    _, probs = attention(h, ctx.double(), cmask, bert.layers[1].crossattention, HEADS)
    close(out.cross_attentions[1], probs)
    assert (out.cross_attentions[1][1, :, :, 6:] == 0).all()


@pytest.mark.parametrize("with_context", [True, False])
def test_last_queries_one_gives_the_full_pass_cls(bert, tokenizer, with_context):
    ids, mask = text_batch(tokenizer)
    ctx, cmask = image_context() if with_context else (None, None)
    with torch.no_grad():
        full = bert(bert.embed(ids), mask, ctx, cmask, return_last_self=True)
        cls = bert(bert.embed(ids), mask, ctx, cmask, return_last_self=True, last_queries=1)
    assert cls.hidden.shape == (3, 1, D) and cls.last_self_attention.shape == (3, HEADS, 1, ids.shape[1])
    torch.testing.assert_close(cls.hidden[:, 0], full.hidden[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.last_self_attention[:, :, 0], full.last_self_attention[:, :, 0],
                               rtol=1e-5, atol=1e-7)


def test_return_last_self_is_the_softmax_of_the_last_cls_scores_over_real_keys(bert, tokenizer):
    ids, mask = text_batch(tokenizer)
    ctx, cmask = image_context()
    with torch.no_grad():
        out = bert(bert.embed(ids), mask, ctx, cmask, return_last_self=True, last_queries=1)
    a = out.last_self_attention[:, :, 0]   # (B, heads, L)
    # by hand: the last layer's input from the reference, then its CLS query's scores and softmax
    x = ref_embed(bert, ids)
    x, _ = ref_layer(bert.layers[0], x, mask, ctx.double(), cmask, HEADS)
    p = bert.layers[1].attention.self
    hd = D // HEADS
    q = lin(x[:, :1], p.query).reshape(3, 1, HEADS, hd).transpose(1, 2)
    k = lin(x, p.key).reshape(3, -1, HEADS, hd).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(hd)   # (B, heads, L)
    want = torch.zeros_like(scores)
    for i in range(3):
        real = mask[i].bool()
        e = torch.exp(scores[i][:, real] - scores[i][:, real].max(-1, keepdim=True).values)
        want[i][:, real] = e / e.sum(-1, keepdim=True)
    close(a, want)
    assert (a[~mask.bool()[:, None, :].expand_as(a)] == 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3, HEADS))


def test_the_query_stream_adds_position_embeddings_and_layer_norm(bert, tokenizer):
    ids, mask = text_batch(tokenizer)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 17, D, generator=g) * 3 + 1   # image tokens (CLS + 16 patches) from a ViT as wide as BERT
    with torch.no_grad():
        q = bert.embed_inputs(z)
    e = bert.embeddings
    x = z.double() + e.position_embeddings.weight.double()[:17]
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    close(q, (x - mu) / torch.sqrt(var + e.LayerNorm.eps) * e.LayerNorm.weight.double() + e.LayerNorm.bias.double())
    # the MIM pass: the image tokens are the queries (no key mask), the caption's embeddings the context
    text = SingleStreamBert(tiny_text(), D)
    scramble(text, seed=4).eval()
    with torch.no_grad():
        got = text(text.embed_inputs(z), None, text.embed(ids), mask).hidden
    want, _ = ref_bert(text, ref_embed(text, embeds=z), None, ref_embed(text, ids), mask)
    close(got, want)
    with pytest.raises(ValueError, match="position embeddings"):
        bert.embed_inputs(torch.zeros(1, 65, D))


def test_vision_width_must_equal_the_bert_width():
    cfg = ModelConfig(family="single_stream",
                      vision=VisionConfig(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                                          depth=1, num_heads=2, mask_token=True),
                      text=tiny_text(), itc=ContrastiveHeadConfig(embed_dim=16, projection="linear"))
    with pytest.raises(ValueError) as info:
        VLPBackbone(cfg)
    assert "vision width 48 must equal the text hidden size 64" in str(info.value)
    cfg.vision.embed_dim = 64
    assert VLPBackbone(cfg).text.hidden_size == 64
