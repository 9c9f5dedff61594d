import pytest
import timm
import torch

from models.vision import VisionConfig, VisionEncoder


def small(**kw):
    base = dict(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    base.update(kw)
    return VisionConfig(**base)


def test_image_path_equals_timm_forward_features():
    torch.manual_seed(0)
    enc = VisionEncoder(small()).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=48, depth=3, num_heads=3).eval()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "temporal_embed"})
    x = torch.randn(2, 3, 32, 32)
    out = enc(x[:, None])
    assert out.num_frames == 1 and out.tokens.shape == (2, 1 + 16, 48)
    torch.testing.assert_close(out.tokens, ref.forward_features(x), rtol=1e-5, atol=1e-5)


def test_video_attention_matches_masked_full_attention():
    """Frame-CLS tokens see every frame, patch tokens only their own frame: compare with timm blocks + an explicit mask."""
    torch.manual_seed(0)
    enc = VisionEncoder(small()).eval()
    b, f, p = 2, 3, 16
    x = torch.randn(b, f, 3, 32, 32)
    out = enc(x)
    assert out.tokens.shape == (b, f + f * p, 48)

    tokens = enc.norm_pre(enc.embed(x))  # (B, F, 1+P, D)
    seq = tokens.flatten(1, 2)  # frame-major: [cls_1, patches_1, cls_2, ...]
    frame_of = torch.arange(f).repeat_interleave(1 + p)
    is_cls = (torch.arange(f * (1 + p)) % (1 + p)) == 0
    allowed = is_cls[:, None] | (frame_of[:, None] == frame_of[None, :])
    for blk in enc.blocks:
        seq = blk(seq, attn_mask=allowed)
    seq = enc.norm(seq).unflatten(1, (f, 1 + p))
    expected = torch.cat([seq[:, :, 0], seq[:, :, 1:].flatten(1, 2)], dim=1)
    torch.testing.assert_close(out.tokens, expected, rtol=1e-4, atol=1e-5)


def test_frames_interact_only_through_cls():
    torch.manual_seed(0)
    enc = VisionEncoder(small(depth=1)).eval()  # one block: patches of frame 0 cannot see frame 1 at all
    x = torch.randn(1, 2, 3, 32, 32)
    y = x.clone()
    y[:, 1] = torch.randn(3, 32, 32)
    a, b = enc(x).tokens, enc(y).tokens
    p = 16
    torch.testing.assert_close(a[:, 2:2 + p], b[:, 2:2 + p])  # frame-0 patches unchanged
    assert not torch.allclose(a[:, 0], b[:, 0])  # frame-0 CLS sees frame 1


def test_temporal_embedding_distinguishes_frame_order():
    torch.manual_seed(0)
    enc = VisionEncoder(small()).eval()
    x = torch.randn(1, 2, 3, 32, 32)
    a = enc(x).global_feature
    b = enc(x.flip(1)).global_feature
    assert not torch.allclose(a, b, atol=1e-4)


def test_drop_last_blocks_and_clip_style_model():
    enc = VisionEncoder(small(timm_name="vit_base_patch16_clip_224", depth=4, drop_last_blocks=1))
    assert len(enc.blocks) == 3
    assert not isinstance(enc.norm_pre, torch.nn.Identity)  # CLIP's ln_pre is kept
    with pytest.raises(ValueError, match="leaves no block"):
        VisionEncoder(small(depth=2, drop_last_blocks=2))
    with pytest.raises(ValueError, match="timm_name"):
        VisionEncoder(small(timm_name="resnet18"))


def test_load_timm_weights_resamples_position_embedding():
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, patch_size=8,
                            embed_dim=48, depth=3, num_heads=3)
    enc = VisionEncoder(small(img_size=32, drop_last_blocks=1))
    enc.load_timm_state_dict(src.state_dict())  # 8x8 grid -> 4x4, head and last block dropped by name
    torch.testing.assert_close(enc.patch_embed.proj.weight, src.patch_embed.proj.weight)
    torch.testing.assert_close(enc.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert enc.pos_embed.shape == (1, 17, 48)
    bad = dict(src.state_dict())
    bad.pop("norm.weight")
    with pytest.raises(ValueError, match="missing"):
        enc.load_timm_state_dict(bad)


def test_too_many_frames_is_a_clear_error():
    enc = VisionEncoder(small(max_frames=2))
    with pytest.raises(ValueError, match="max_frames"):
        enc(torch.randn(1, 3, 3, 32, 32))
