import pytest
import torch
from transformers import AutoModel

from models.fusion import FusionConfig, FusionEncoder
from models.text import TextConfig, TextEncoder, resolve_path


def test_minilm_loads_offline_and_matches_transformers(tokenizer):
    ours = TextEncoder(TextConfig(pretrained="minilm")).eval()
    ref = AutoModel.from_pretrained(resolve_path("minilm"), local_files_only=True).eval()
    enc = tokenizer(["a small red circle left of a large blue square", "a dog"], padding="max_length",
                    max_length=16, return_tensors="pt")
    with torch.no_grad():
        got = ours(enc["input_ids"], enc["attention_mask"])
        want = ref(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_text_encoder_is_bidirectional_and_ignores_padding(tokenizer):
    torch.manual_seed(0)
    enc_model = TextEncoder(TextConfig(tokenizer="minilm", hidden_size=64, num_layers=2, num_heads=2,
                                       intermediate_size=128)).eval()
    a = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    b = tokenizer(["a red square"], padding="max_length", max_length=8, return_tensors="pt")
    ha = enc_model(a["input_ids"], a["attention_mask"])
    hb = enc_model(b["input_ids"], b["attention_mask"])
    assert not torch.allclose(ha[:, 0], hb[:, 0])  # CLS (position 0) depends on a later word
    longer = tokenizer(["a red circle"], padding="max_length", max_length=12, return_tensors="pt")
    hl = enc_model(longer["input_ids"], longer["attention_mask"])
    n = int(a["attention_mask"].sum())
    torch.testing.assert_close(ha[:, :n], hl[:, :n], rtol=1e-5, atol=1e-5)


def test_roberta_random_init_builds():
    enc = TextEncoder(TextConfig(tokenizer="minilm", arch="roberta", hidden_size=32, num_layers=1, num_heads=2,
                                 intermediate_size=64, vocab_size=100, max_position_embeddings=16))
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    out = enc(ids, (ids != 1).long())
    assert out.shape == (1, 6, 32) and torch.isfinite(out).all()


def fusion(layers=2):
    torch.manual_seed(0)
    return FusionEncoder(FusionConfig(hidden_size=32, num_layers=layers, num_heads=4), text_dim=24,
                         vision_dim=16).eval()


def test_fusion_returns_cross_attention_maps_equal_to_sdpa_path():
    f = fusion()
    t = f.project_text(torch.randn(2, 5, 24))
    v = f.project_image(torch.randn(2, 7, 16))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    plain = f(t, mask, v, num_frames=1)
    maps = f(t, mask, v, num_frames=1, return_attention=True)
    torch.testing.assert_close(plain.text, maps.text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.cls_feats, maps.cls_feats, rtol=1e-5, atol=1e-5)
    t2v = maps.text_to_image_attentions[-1]
    assert t2v.shape == (2, 4, 5, 7)
    torch.testing.assert_close(t2v.sum(-1), torch.ones(2, 4, 5))
    v2t = maps.image_to_text_attentions[-1]
    assert v2t[0, :, :, 3:].abs().max() == 0  # padded text keys get no attention


def test_fusion_streams_read_each_other():
    f = fusion(layers=1)
    t = f.project_text(torch.randn(1, 4, 24))
    v = f.project_image(torch.randn(1, 6, 16))
    m = torch.ones(1, 4, dtype=torch.long)
    base = f(t, m, v, num_frames=1)
    other = f(t, m, v + 1.0, num_frames=1)
    assert not torch.allclose(base.text, other.text)  # text stream depends on the image
    assert base.cls_feats.shape == (1, 64)


def test_video_pooler_averages_frame_cls_tokens():
    f = fusion(layers=1)
    t = f.project_text(torch.randn(1, 4, 24))
    v = f.project_image(torch.randn(1, 2 + 2 * 3, 16))
    out = f(t, torch.ones(1, 4, dtype=torch.long), v, num_frames=2)
    expected = f.image_pooler(out.image[:, :2].mean(1))
    torch.testing.assert_close(out.cls_feats[:, 32:], expected)


@pytest.mark.parametrize("frames", [1, 2])
def test_pruned_last_layer_gives_the_same_values_it_keeps(frames):
    """text_out/image_out="cls"|"none" skip last-layer work the caller never reads; what is kept is unchanged."""
    f = fusion(layers=2)
    t = f.project_text(torch.randn(2, 5, 24))
    v = f.project_image(torch.randn(2, frames + frames * 3, 16))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    full = f(t, mask, v, num_frames=frames)
    cls = f(t, mask, v, num_frames=frames, text_out="cls", image_out="cls")
    assert cls.text.shape == (2, 1, 32) and cls.image.shape == (2, frames, 32)
    torch.testing.assert_close(cls.text, full.text[:, :1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.image, full.image[:, :frames], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.cls_feats, full.cls_feats, rtol=1e-5, atol=1e-6)
    text_only = f(t, mask, v, num_frames=frames, image_out="none")
    assert text_only.image is None and text_only.cls_feats is None
    torch.testing.assert_close(text_only.text, full.text, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="text_out"):
        f(t, mask, v, num_frames=frames, text_out="first")
