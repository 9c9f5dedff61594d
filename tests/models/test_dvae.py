"""models/dvae.py: the DALL·E dVAE encoder (SIMLA's image tokenizer). Its keys and shapes against a list built here from
the architecture description, its forward against a functional reference, float32 codes under bf16 autocast, the
load_dvae round trip and bad files."""
import pytest
import torch
import torch.nn.functional as F

from models.dvae import DVAEEncoder, load_dvae, map_pixels, small_random_dvae
from models.weights import WeightsError, save_weights


def expected_shapes(hidden, blocks_per_group, vocab, cin=3):
    """dall_e's encoder, key by key: 7x7 input conv; 4 groups of widths 1,2,4,8 x hidden; blocks with a 1x1 id_path
    only where the width changes and a 3,3,3,1 res_path at width/4; a 1x1 output conv to the vocabulary."""
    shapes = {"blocks.input.w": (hidden, cin, 7, 7), "blocks.input.b": (hidden,)}
    prev = hidden
    for g, width in enumerate([hidden, 2 * hidden, 4 * hidden, 8 * hidden], start=1):
        for j in range(1, blocks_per_group + 1):
            p, n_in, mid = f"blocks.group_{g}.block_{j}.", prev if j == 1 else width, width // 4
            if n_in != width:
                shapes[p + "id_path.w"], shapes[p + "id_path.b"] = (width, n_in, 1, 1), (width,)
            for i, (a, b, k) in enumerate([(n_in, mid, 3), (mid, mid, 3), (mid, mid, 3), (mid, width, 1)], start=1):
                shapes[f"{p}res_path.conv_{i}.w"], shapes[f"{p}res_path.conv_{i}.b"] = (b, a, k, k), (b,)
        prev = width
    shapes["blocks.output.conv.w"], shapes["blocks.output.conv.b"] = (vocab, 8 * hidden, 1, 1), (vocab,)
    return shapes


def reference_logits(sd, x, blocks_per_group):
    """The encoder's forward written out from its weights alone."""
    conv = lambda t, name: F.conv2d(t, sd[name + ".w"], sd[name + ".b"], padding=(sd[name + ".w"].shape[-1] - 1) // 2)
    gain = 1 / (4 * blocks_per_group) ** 2
    h = conv(x, "blocks.input")
    for g in range(1, 5):
        for j in range(1, blocks_per_group + 1):
            p = f"blocks.group_{g}.block_{j}."
            r = h
            for i in range(1, 5):
                r = conv(F.relu(r), f"{p}res_path.conv_{i}")
            h = (conv(h, p + "id_path") if p + "id_path.w" in sd else h) + gain * r
        if g < 4:
            h = F.max_pool2d(h, 2)
    return conv(F.relu(h), "blocks.output.conv")


@pytest.mark.parametrize("sizes", [(256, 2, 8192, 3), (16, 1, 64, 3), (8, 3, 32, 1)])
def test_keys_and_shapes_are_dall_e_s(sizes):
    hidden, bpg, vocab, cin = sizes
    got = {k: tuple(v.shape) for k, v in DVAEEncoder(hidden, bpg, vocab, cin).state_dict().items()}
    assert got == expected_shapes(hidden, bpg, vocab, cin)


def test_shapes_and_codes():
    model = small_random_dvae(vocab_size=64)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert model(map_pixels(x)).shape == (2, 64, 16, 16)
    codes = model.codes(x)
    assert codes.shape == (2, 256) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    # a usable target: the codes spread over the vocabulary rather than collapsing onto a few ids
    assert codes.unique().numel() >= 16
    # row-major 16x16 grid: code i*16+j is the argmax at position (i, j)
    assert torch.equal(codes.view(2, 16, 16), model(map_pixels(x)).argmax(1))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.codes(torch.rand(1, 3, 60, 64))


def test_map_pixels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))


@pytest.mark.parametrize("bpg", [1, 2])
def test_forward_matches_reference(bpg):
    model = small_random_dvae(vocab_size=32, hidden=8, blocks_per_group=bpg, seed=3)
    with torch.no_grad():  # random biases too, so that the bias terms are checked
        for k, v in model.state_dict().items():
            if k.endswith(".b"):
                v.normal_(std=0.1)
    x = map_pixels(torch.rand(2, 3, 32, 40))
    with torch.no_grad():
        assert torch.allclose(model(x), reference_logits(model.state_dict(), x, bpg), atol=1e-5)


def test_codes_are_float32_and_gradient_free_under_autocast():
    model = small_random_dvae(vocab_size=256)
    x = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fp32 = model.codes(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = model(map_pixels(x)).argmax(1).flatten(1)
        under_autocast = model.codes(x)
    assert not torch.equal(in_bf16, fp32), "bf16 logits flip no argmax here: this test would prove nothing"
    assert torch.equal(under_autocast, fp32)
    assert under_autocast.grad_fn is None
    # a tokenizer someone cast to bf16 still computes in fp32: the codes of its rounded weights held in fp32
    cast = small_random_dvae(vocab_size=256).to(torch.bfloat16)
    rounded = DVAEEncoder(**cast.sizes())
    rounded.load_state_dict({k: v.float() for k, v in cast.state_dict().items()})
    assert torch.equal(cast.codes(x), rounded.codes(x))


def test_small_random_dvae_is_frozen_and_seeded():
    a, b, c = small_random_dvae(64), small_random_dvae(64), small_random_dvae(64, seed=1)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.blocks.input.w, c.blocks.input.w)


def _write(model, path, **meta):
    save_weights(model.state_dict(), str(path), {"kind": "dvae", **model.sizes(), **meta})
    return str(path)


def test_load_dvae_round_trip(tmp_path):
    model = small_random_dvae(vocab_size=64, hidden=8, blocks_per_group=2, seed=5)
    loaded = load_dvae(_write(model, tmp_path / "dvae.safetensors"))
    assert loaded.sizes() == {"hidden": 8, "blocks_per_group": 2, "vocab_size": 64, "in_channels": 3}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.codes(x), model.codes(x))


def _one_line_error(path):
    with pytest.raises(WeightsError) as e:
        load_dvae(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_bad_files(tmp_path):
    _one_line_error(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file" * 10)
    _one_line_error(junk)
    model = small_random_dvae(vocab_size=64, hidden=8)
    other = tmp_path / "vision.safetensors"
    save_weights(model.state_dict(), str(other), {"kind": "vision"})
    assert "not a dVAE" in _one_line_error(other)
    no_sizes = tmp_path / "no_sizes.safetensors"
    save_weights(model.state_dict(), str(no_sizes), {"kind": "dvae"})
    assert "metadata" in _one_line_error(no_sizes)
    sd = model.state_dict()
    del sd["blocks.group_2.block_1.id_path.w"]
    partial = tmp_path / "partial.safetensors"
    save_weights(sd, str(partial), {"kind": "dvae", **model.sizes()})
    assert "blocks.group_2.block_1.id_path.w" in _one_line_error(partial)
    wrong = tmp_path / "wrong_sizes.safetensors"
    _write(model, wrong, hidden=16)
    assert "shape mismatch" in _one_line_error(wrong)
