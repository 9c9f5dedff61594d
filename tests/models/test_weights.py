"""Key mappings between our towers and public formats: every round trip reproduces the source model's outputs.

The "public" models are built here with random weights (no downloads): transformers BERT/RoBERTa, a timm ViT, and an
OpenAI-CLIP-layout visual transformer written below from the CLIP architecture (conv1 patchify, class embedding,
ln_pre, residual attention blocks with nn.MultiheadAttention and QuickGELU MLPs, ln_post, proj).
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from models.text import TextConfig, TextEncoder
from models.vision import VisionConfig, VisionEncoder
from models import weights as W

TOL = 1e-5


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (LayerNorm gains/biases too), so a swapped or missed tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.02 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith(("norm.weight", "ln_1.weight",
                                                                                      "ln_2.weight")) else 0.0))
    return module.eval()


# --------------------------------------------------------------------------------------------------- text
def _hf_text(arch: str):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=120,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "roberta":
        return RobertaModel(RobertaConfig(max_position_embeddings=42, pad_token_id=1, **common)).eval()
    return BertModel(BertConfig(max_position_embeddings=40, **common)).eval()


def _text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 1  # padding id (RoBERTa's padding_idx)
    return ids, mask


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_hf_text_import_and_export_round_trip(arch, tmp_path):
    from transformers import AutoModel

    src = _randomize(_hf_text(arch), 0)
    src.save_pretrained(tmp_path / "src")
    ids, mask = _text_batch()
    with torch.no_grad():
        want = src(input_ids=ids, attention_mask=mask).last_hidden_state

    sd, config = W.read_hf_dir(str(tmp_path / "src"))
    tower_sd, dropped = W.hf_text_to_tower(sd)
    assert dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    tcfg = W.text_config_dict(config)
    ours = TextEncoder(TextConfig(**{**tcfg, "tokenizer": "minilm", "dropout": 0.0})).eval()
    W.load_strict(ours, tower_sd, "test")
    with torch.no_grad():
        got = ours(ids, mask)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= TOL

    W.export_text_hf(ours.state_dict(), config, str(tmp_path / "out"))
    back, info = AutoModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    with torch.no_grad():
        again = back.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (again - want)[real].abs().max() <= TOL


def test_text_mapping_strips_mlm_model_prefix_and_names_heads():
    from transformers import BertConfig, BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50, max_position_embeddings=20))
    tower_sd, dropped = W.hf_text_to_tower(mlm.state_dict())
    assert dropped and all(k.startswith("cls.") for k in dropped)
    assert all(k.startswith(("embeddings.", "layers.0.")) for k in tower_sd)
    assert torch.equal(tower_sd["layers.0.output.dense.weight"], mlm.bert.encoder.layer[0].output.dense.weight)


# --------------------------------------------------------------------------------------------------- vision (timm)
def _timm_vit(depth=3, num_classes=10):
    import timm

    return _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                        embed_dim=48, depth=depth, num_heads=3, num_classes=num_classes), 0)


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("drop", [0, 1])
def test_timm_vit_import_matches_timm_and_exports_back(drop, tmp_path):
    import timm

    ref = _timm_vit()
    x = _images()
    tower_sd, dropped = W.timm_vit_to_tower(ref.state_dict(), depth=3, drop_last_blocks=drop, max_frames=4)
    assert {"head.weight", "head.bias"} <= set(dropped)
    assert sorted({k.split(".")[1] for k in dropped if k.startswith("blocks.")}) == (["2"] if drop else [])
    shape = W.infer_vit_shape(ref.state_dict(), "ref")
    cfg = W.vision_config_dict("vit_tiny_patch16_224", shape, 3, 32, drop, 4)
    ours = W.build_vision_tower(cfg).eval()
    W.load_strict(ours, tower_sd, "test")
    if drop:
        ref.blocks = ref.blocks[:-drop]  # the reference ViT without its last block
    with torch.no_grad():
        want = ref.forward_features(x)  # (B, 1 + P, D) after the final norm
        got = ours(x[:, None]).tokens  # 1 frame: [CLS, patches]
    assert got.shape == want.shape and (got - want).abs().max() <= TOL

    dropped_out = W.export_vision_timm(ours.state_dict(), cfg, str(tmp_path / "timm"))
    assert dropped_out == ["temporal_embed"]
    back = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert len(back.blocks) == 3 - drop
    with torch.no_grad():
        assert (back.forward_features(x) - want).abs().max() <= TOL


def test_timm_import_resamples_pos_embed_to_a_new_resolution():
    ref = _timm_vit(num_classes=0)
    tower_sd, _ = W.timm_vit_to_tower(ref.state_dict(), depth=3, drop_last_blocks=0, max_frames=2, img_size=48)
    assert tower_sd["pos_embed"].shape == (1, 1 + 6 * 6, 48)
    shape = W.infer_vit_shape(ref.state_dict(), "ref")
    ours = W.build_vision_tower(W.vision_config_dict("vit_tiny_patch16_224", shape, 3, 48, 0, 2))
    W.load_strict(ours, tower_sd, "test")
    assert ours(_images(size=48)[:, None]).tokens.shape == (2, 1 + 36, 48)


def test_vision_tower_keys_are_timm_keys_plus_temporal_embed():
    vit = _timm_vit(num_classes=0)
    ours = VisionEncoder(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                                      num_heads=3))
    assert set(ours.state_dict()) - set(vit.state_dict()) == {"temporal_embed"}
    assert set(vit.state_dict()) - set(ours.state_dict()) == set()


# --------------------------------------------------------------------------------------------------- OpenAI CLIP
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # (L, B, D), sequence-first like nn.MultiheadAttention's default
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads) for _ in range(layers)])


class RefCLIPVisual(nn.Module):
    """The OpenAI CLIP ViT image tower, parameter names as in CLIP's state dicts (prefix `visual.`)."""

    def __init__(self, size, patch, width, layers, heads, out_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def tokens(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
        x = self.transformer.resblocks(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x)  # CLIP applies ln_post to the CLS token; LayerNorm is per token, so all are comparable


def _clip_state_dict(ref):
    sd = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    # a few text-side tensors of a full CLIP checkpoint: dropped by name
    sd.update({"token_embedding.weight": torch.zeros(10, 16), "ln_final.weight": torch.ones(16),
               "text_projection": torch.zeros(16, 16), "logit_scale": torch.ones(())})
    return sd


@pytest.mark.parametrize("whole_model", [True, False])
def test_openai_clip_import_matches_the_reference_forward(whole_model):
    ref = _randomize(RefCLIPVisual(size=32, patch=8, width=128, layers=2, heads=2, out_dim=16), 3)
    sd = _clip_state_dict(ref) if whole_model else dict(ref.state_dict())  # a full CLIP, or the visual module alone
    timm_sd, dropped, heads = W.openai_clip_to_timm(sd)
    assert heads == 2  # width // 64
    assert dropped == (sorted(["visual.proj", "token_embedding.weight", "ln_final.weight", "text_projection",
                               "logit_scale"]) if whole_model else ["proj"])
    shape = W.infer_vit_shape(timm_sd, "clip")
    tower_sd, _ = W.timm_vit_to_tower(timm_sd, shape["depth"], 0, max_frames=2)
    cfg = W.vision_config_dict("vit_base_patch16_clip_quickgelu_224", shape, heads, 32, 0, 2)
    ours = W.build_vision_tower(cfg).eval()
    W.load_strict(ours, tower_sd, "test")
    x = _images()
    with torch.no_grad():
        want, got = ref.tokens(x), ours(x[:, None]).tokens
    assert (got - want).abs().max() <= TOL
    # The wrong activation (plain GELU) is a different function: the matching timm name matters.
    gelu = W.build_vision_tower({**cfg, "timm_name": "vit_base_patch16_clip_224"}).eval()
    W.load_strict(gelu, tower_sd, "test")
    with torch.no_grad():
        assert (gelu(x[:, None]).tokens - want).abs().max() > 1e-3


def test_openai_clip_import_matches_open_clip_vision_transformer():
    """The same check against open_clip's own VisionTransformer (QuickGELU, OpenAI layout), incl. the projection we
    drop: our CLS token @ visual.proj is open_clip's pooled image embedding."""
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    ref = _randomize(open_clip_transformer.VisionTransformer(
        image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=16,
        act_layer=open_clip_transformer.QuickGELU, output_tokens=True), 4)
    sd = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    timm_sd, dropped, heads = W.openai_clip_to_timm(sd)
    assert dropped == ["visual.proj"]
    shape = W.infer_vit_shape(timm_sd, "open_clip")
    tower_sd, _ = W.timm_vit_to_tower(timm_sd, shape["depth"], 0, max_frames=2)
    ours = W.build_vision_tower(W.vision_config_dict("vit_base_patch16_clip_quickgelu_224", shape, heads, 32, 0, 2))
    W.load_strict(ours.eval(), tower_sd, "test")
    x = _images()
    with torch.no_grad():
        pooled, patches = ref(x)
        tokens = ours(x[:, None]).tokens
    assert (tokens[:, 1:] - patches).abs().max() <= TOL
    assert (tokens[:, 0] @ sd["visual.proj"] - pooled).abs().max() <= TOL


def test_openai_clip_resnet_and_unknown_keys_are_named():
    with pytest.raises(W.WeightsError, match="ResNet"):
        W.openai_clip_to_timm({"visual.attnpool.c_proj.weight": torch.zeros(1), "visual.conv1.weight": torch.zeros(1)})
    ref = RefCLIPVisual(size=16, patch=8, width=64, layers=1, heads=1, out_dim=8)
    sd = _clip_state_dict(ref)
    sd["visual.transformer.resblocks.0.attn.bias_k"] = torch.zeros(1, 1, 64)
    with pytest.raises(W.WeightsError, match="resblocks.0.attn.bias_k"):
        W.openai_clip_to_timm(sd)


# --------------------------------------------------------------------------------------------------- resizing
def test_pos_embed_resample_shapes_and_identity():
    pe = torch.randn(1, 1 + 16, 8)
    assert W.resample_pos_embed(pe, (4, 4), (4, 4)) is pe
    out = W.resample_pos_embed(pe, (6, 6), (4, 4))
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])
    const = torch.ones(1, 17, 8) * 0.5  # a constant field stays constant under interpolation
    assert torch.allclose(W.resample_pos_embed(const, (7, 7), (4, 4))[:, 1:], torch.full((1, 49, 8), 0.5), atol=1e-6)


def test_temporal_embed_resize():
    table = torch.randn(1, 8, 4)
    assert W.resize_temporal_embed(table, 4, trained_frames=4) is table
    assert W.resize_temporal_embed(table, 1, trained_frames=1) is table  # image-only pretraining, 1 frame
    ramp = torch.zeros(1, 8, 4)
    ramp[0, :4] = torch.arange(4.0)[:, None]  # rows 0..3 trained as a linear ramp in time
    out = W.resize_temporal_embed(ramp, 7, trained_frames=4)
    expected = torch.linspace(0, 3, 7)[:, None].expand(7, 4)  # the same ramp, sampled at 7 uniform times
    assert out.shape == (1, 7, 4) and torch.allclose(out[0], expected, atol=1e-6)
    grown = W.resize_temporal_embed(table, 12, trained_frames=1)  # nothing trained: keep rows, zero new ones
    assert grown.shape == (1, 12, 4) and torch.equal(grown[:, :8], table) and not grown[:, 8:].any()
    with pytest.raises(W.WeightsError, match="trained_frames=9"):
        W.resize_temporal_embed(table, 4, trained_frames=9)


def test_one_frame_same_resolution_model_is_unchanged_by_resizing():
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1,
                                     num_heads=3)).eval()
    x = _images()[:, None]
    with torch.no_grad():
        before = enc(x).tokens
        enc.pos_embed.data = W.resample_pos_embed(enc.pos_embed.data, (4, 4), (4, 4))
        enc.temporal_embed.data = W.resize_temporal_embed(enc.temporal_embed.data, 1, trained_frames=1)
        assert torch.equal(enc(x).tokens, before)


# --------------------------------------------------------------------------------------------------- files
class PickledThing:  # an arbitrary pickled object: refused by weights_only=True
    pass


def test_files_are_strict_and_atomic(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    W.save_weights(sd, str(tmp_path / "w.safetensors"), {"kind": "vision", "dropped": ["x"]})
    loaded, meta = W.load_weights(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], sd[k]) for k in sd) and meta["kind"] == "vision" and meta["dropped"] == '["x"]'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no tmp file left behind

    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    assert sorted(W.load_weights(str(tmp_path / "wrapped.pth"))[0]) == ["a", "b"]

    torch.save({"a": torch.zeros(1), "obj": PickledThing()}, tmp_path / "pickled.pth")
    with pytest.raises(W.WeightsError, match="pickled.pth.*weights_only=True"):
        W.load_weights(str(tmp_path / "pickled.pth"))
    with pytest.raises(W.WeightsError, match="missing \\[b\\].*unexpected \\[c\\]"):
        W.check_keys({"a": torch.zeros(4), "c": torch.zeros(1)}, sd, "test")
    with pytest.raises(W.WeightsError, match="a: \\(3,\\) vs expected \\(4,\\)"):
        W.check_keys({"a": torch.zeros(3), "b": torch.zeros(2, 2)}, sd, "test")
