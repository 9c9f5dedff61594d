"""The co-attention fusion encoder (models/fusion.py) against a reference written here in plain torch from its
parameters: per depth, both streams are computed from the SAME inputs (the other stream's previous-layer output),
each layer = self-attention (key mask) -> add & LayerNorm -> cross-attention (query from its own stream, key/value
from the other stream's previous layer, key mask) -> add & LayerNorm -> FFN with exact GELU -> add & LayerNorm
(post-LN, eps from the config); token-type embeddings (text row 0, image row 1) added to the inputs; poolers =
tanh(Linear) on the text CLS and on the mean of the frame CLS tokens; cls_feats = [pooled text ; pooled image].

The parameters are re-drawn at a large scale (BERT init leaves LayerNorm at 1/0 and biases at 0, which would hide
mistakes in them), and the LayerNorm eps is set far from its default so that ignoring the config is visible."""
import math

import pytest
import torch

from models.fusion import FusionConfig, FusionEncoder

D, HEADS, TEXT_DIM, VISION_DIM, EPS = 32, 4, 24, 16, 0.25


def build(layers):
    torch.manual_seed(0)
    enc = FusionEncoder(FusionConfig(hidden_size=D, num_layers=layers, num_heads=HEADS, mlp_ratio=2.0,
                                     layer_norm_eps=EPS), text_dim=TEXT_DIM, vision_dim=VISION_DIM).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():   # every weight, bias, LayerNorm gain/shift and embedding matters
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1) * 0.1)
    return enc


# ---------------------------------------------------------------- the reference, from the parameters only

def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)   # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + EPS) * ln.weight + ln.bias


def gelu(x):   # exact (erf) GELU
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(att, x, ctx, key_mask):
    """Multi-head attention of x's tokens over ctx's; key_mask (B, Lk) bool or None. -> (out, probs)."""
    b, lq, lk, hd = x.shape[0], x.shape[1], ctx.shape[1], D // HEADS
    q = linear(x, att.q).reshape(b, lq, HEADS, hd).permute(0, 2, 1, 3)
    k = linear(ctx, att.k).reshape(b, lk, HEADS, hd).permute(0, 2, 1, 3)
    v = linear(ctx, att.v).reshape(b, lk, HEADS, hd).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, lq, D), probs


def ref_layer(layer, x, x_mask, other, other_mask):
    a, _ = attention(layer.self_attn, x, x, x_mask)
    x = layer_norm(x + linear(a, layer.self_out), layer.self_norm)
    a, probs = attention(layer.cross_attn, x, other, other_mask)
    x = layer_norm(x + linear(a, layer.cross_out), layer.cross_norm)
    h = linear(gelu(linear(x, layer.ffn[0])), layer.ffn[2])
    return layer_norm(x + h, layer.ffn_norm), probs


def ref_fusion(enc, text, text_mask, image, num_frames, image_mask=None):
    """text/image: raw tower outputs (before the input projections)."""
    t = linear(text, enc.text_in) + enc.token_type.weight[0]
    v = linear(image, enc.image_in) + enc.token_type.weight[1]
    tm = text_mask.bool()
    vm = None if image_mask is None else image_mask.bool()
    t_maps, v_maps = [], []
    for block in enc.layers:
        t_next, t2v = ref_layer(block.text, t, tm, v, vm)     # both read the other stream's previous output
        v_next, v2t = ref_layer(block.image, v, vm, t, tm)
        t, v = t_next, v_next
        t_maps.append(t2v)
        v_maps.append(v2t)
    pooled_t = torch.tanh(linear(t[:, 0], enc.text_pooler[0]))
    pooled_v = torch.tanh(linear(v[:, :num_frames].mean(1), enc.image_pooler[0]))
    return t, v, torch.cat([pooled_t, pooled_v], -1), t_maps, v_maps


def inputs(frames=1, patches=3, image_mask=False):
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    image = torch.randn(2, frames + frames * patches, VISION_DIM, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    vmask = None
    if image_mask:
        vmask = torch.ones(2, image.shape[1], dtype=torch.long)
        vmask[0, -2:] = 0
    return text, text_mask, image, vmask


def run(enc, text, text_mask, image, frames, vmask, **kw):
    return enc(enc.project_text(text), text_mask, enc.project_image(image), frames, image_mask=vmask, **kw)


CLOSE = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("frames,image_mask", [(1, False), (1, True), (2, False)])
def test_fusion_equals_plain_torch_reference(layers, frames, image_mask):
    enc = build(layers)
    text, tmask, image, vmask = inputs(frames, image_mask=image_mask)
    with torch.no_grad():
        got = run(enc, text, tmask, image, frames, vmask)
        t, v, cls_feats, _, _ = ref_fusion(enc, text, tmask, image, frames, vmask)
    assert got.text.shape == t.shape and got.image.shape == v.shape and got.cls_feats.shape == (2, 2 * D)
    torch.testing.assert_close(got.text, t, **CLOSE)   # padded positions included: the same math
    torch.testing.assert_close(got.image, v, **CLOSE)
    torch.testing.assert_close(got.cls_feats, cls_feats, **CLOSE)


def test_cross_attention_maps_equal_reference():
    enc = build(2)
    text, tmask, image, vmask = inputs(image_mask=True)
    with torch.no_grad():
        got = run(enc, text, tmask, image, 1, vmask, return_attention=True)
        _, _, _, t_maps, v_maps = ref_fusion(enc, text, tmask, image, 1, vmask)
    assert len(got.text_to_image_attentions) == len(got.image_to_text_attentions) == 2
    for i in range(2):
        torch.testing.assert_close(got.text_to_image_attentions[i], t_maps[i], **CLOSE)
        torch.testing.assert_close(got.image_to_text_attentions[i], v_maps[i], **CLOSE)


def test_image_stream_reads_previous_text_layer_not_current():
    """The parallel update has power to tell: a sequential update (the image stream reading the text stream's
    CURRENT-layer output) gives a different image stream, already after one layer."""
    enc = build(1)
    text, tmask, image, _ = inputs()
    with torch.no_grad():
        got = run(enc, text, tmask, image, 1, None)
        t0 = linear(text, enc.text_in) + enc.token_type.weight[0]
        v0 = linear(image, enc.image_in) + enc.token_type.weight[1]
        t1, _ = ref_layer(enc.layers[0].text, t0, tmask.bool(), v0, None)
        sequential, _ = ref_layer(enc.layers[0].image, v0, None, t1, tmask.bool())
    assert (got.image - sequential).abs().max() > 1e-2
