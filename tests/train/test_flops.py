import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.config import load_config  # noqa: E402
from train.flops import count_flops, main  # noqa: E402

TINY = str(Path(__file__).resolve().parents[2] / "train" / "configs" / "tiny_test.yaml")
GLSCL = ["objectives.mgsc={}", "objectives.mltc={}", "objectives.itm.pairs=b"]


@pytest.fixture(scope="module")
def flops():
    return count_flops(load_config(TINY, GLSCL), batch_size=2, log=lambda *_: None)


def test_official_costs_more_than_shared_passes(flops):
    assert flops["official"]["total"] > flops["ours"]["total"] > 0
    # the group that shares passes A/B re-encodes nothing unmasked in ours
    assert flops["ours"]["parts"]["mgsc+mltc"] < flops["official"]["parts"]["mgsc+mltc"]


def test_total_is_sum_of_parts(flops):
    for side in ("ours", "official"):
        assert sum(flops[side]["parts"].values()) == pytest.approx(flops[side]["total"], rel=1e-9)
    assert set(flops["ours"]["parts"]) == {"pass:image", "pass:text", "itc", "itm", "mlm", "mgsc+mltc"}
    assert set(flops["official"]["parts"]) == {"itc", "itm", "mlm", "mgsc+mltc"}


def test_script_last_line_is_ratio(capsys):
    assert main(["--config", TINY, "--batch", "2", *GLSCL]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"ratio: ([0-9.]+)", last)
    assert m and 0 < float(m.group(1)) < 1


# ------------------------------------------------------------------------------ the single-stream family (SIMLA)
SIMLA_TINY = str(Path(__file__).resolve().parents[2] / "train" / "configs" / "simla_tiny_test.yaml")
SIMLA_PARTS = {"pass:momentum", "pass:image", "pass:text", "ita", "itm", "xmm_text", "xmm_image", "psl"}


@pytest.fixture(scope="module")
def simla_cfg():
    return load_config(SIMLA_TINY, ["model.text.dropout=0.1"])


@pytest.fixture(scope="module")
def simla_flops(simla_cfg):
    return count_flops(simla_cfg, batch_size=2, log=lambda *_: None)


def _conv(c_in, c_out, k, side):
    return 2 * c_in * c_out * k * k * side * side


def _dvae_forward(hidden, blocks, vocab, side):
    """The DALL-E dVAE encoder's conv FLOPs on a side x side view, from its architecture (models/dvae.py docstring):
    7x7 input conv; 4 groups of `blocks` residual blocks (1x1 id path where the width changes; 3x3, 3x3, 3x3, 1x1
    res path through width/4), widths 1, 2, 4, 8 x hidden, a 2x2 max-pool after groups 1-3; 1x1 output conv."""
    total, width = _conv(3, hidden, 7, side), hidden
    for g in range(4):
        out = hidden * 2 ** g
        for _ in range(blocks):
            hid = out // 4
            total += (_conv(width, out, 1, side) if width != out else 0) + _conv(width, hid, 3, side) \
                + 2 * _conv(hid, hid, 3, side) + _conv(hid, out, 1, side)
            width = out
        if g < 3:
            side //= 2
    return total + _conv(width, vocab, 1, side)


def _encoder_forward(tokens, width, ffn, layers, attn=1.0):
    """Matmul FLOPs of `layers` transformer layers on `tokens` tokens (q, k, v, out projections, the FFN), and the
    attention's two matmuls times `attn`."""
    linear = 4 * 2 * tokens * width * width + 2 * 2 * tokens * width * ffn
    return layers * (linear + attn * 2 * 2 * tokens * tokens * width)


def test_single_stream_unmasked_encodings_match_an_analytic_count(simla_cfg, simla_flops):
    """pass:text / pass:image (forward + the backward of every gradient sent to them) against a count from the sizes:
    every matmul's backward is 2x its forward (input and weight gradients), the patch embedding's 1x (pixels need no
    gradient). The text attention has dropout (decomposed math on CPU: backward 2x); the ViT's has none (the fused
    CPU kernel, counted by torch's SDPA formula: backward 2.5x, it recomputes the scores)."""
    ours = simla_flops["ours"]["parts"]
    L = simla_cfg.data.max_text_len
    t = simla_cfg.model.text
    text = _encoder_forward(L, t.hidden_size, t.intermediate_size, t.num_layers)
    assert ours["pass:text"] == 3 * text
    v = simla_cfg.model.vision
    grid = v.img_size // v.patch_size
    tokens, patch = grid * grid + 1, _conv(3, v.embed_dim, v.patch_size, grid)
    blocks = _encoder_forward(tokens, v.embed_dim, 4 * v.embed_dim, v.depth, attn=0.0)
    attention = v.depth * 2 * 2 * tokens * tokens * v.embed_dim
    assert ours["pass:image"] == 3 * blocks + 3.5 * attention + 2 * patch
    # the momentum encoders: forward only, the two towers in text / image mode plus the two ITC projections
    itc = 2 * v.embed_dim * simla_cfg.model.itc.embed_dim * 2
    assert ours["pass:momentum"] == text + blocks + attention + patch + itc


def test_single_stream_parts_sum_to_totals_and_official_computes_every_token(simla_flops):
    for side in ("ours", "official"):
        assert set(simla_flops[side]["parts"]) == SIMLA_PARTS
        assert sum(simla_flops[side]["parts"].values()) == pytest.approx(simla_flops[side]["total"], rel=1e-9)
    ours, official = simla_flops["ours"]["parts"], simla_flops["official"]["parts"]
    # SIMLA's released code encodes each modality once too: only the last layers that ours prunes to the CLS
    # (ITM's 3B multimodal passes, PSL's keyword votes) cost more there; everything else is the same pass
    assert official["itm"] > ours["itm"] and official["psl"] > ours["psl"]
    for k in SIMLA_PARTS - {"itm", "psl"}:
        assert official[k] == ours[k], k


def test_the_image_tokenizer_forward_is_counted_once_inside_its_objective(simla_cfg, simla_flops, monkeypatch):
    """The dVAE (held outside the module tree) runs on the tokenizer view every step: its forward is part of
    xmm_image's FLOPs on both sides, exactly the analytic conv count, and nothing else changes without it."""
    r = simla_cfg.objectives["xmm_image"].random_tokenizer
    want = _dvae_forward(r.hidden, 1, r.vocab_size, simla_cfg.data.tokenizer_view.size)
    assert simla_flops["tokenizers"] == {"xmm_image": want}
    from models.dvae import DVAEEncoder
    # a FLOP-free tokenizer: the same code grid, all zeros (the CE's cost does not depend on the targets)
    monkeypatch.setattr(DVAEEncoder, "codes", lambda self, px: torch.zeros(px.shape[0], (px.shape[-1] // 8) ** 2,
                                                                            dtype=torch.long))
    without = count_flops(simla_cfg, batch_size=2, log=lambda *_: None)
    assert without["tokenizers"] == {"xmm_image": 0}
    for side in ("ours", "official"):
        diff = {k: simla_flops[side]["parts"][k] - without[side]["parts"][k] for k in SIMLA_PARTS}
        assert diff == {**{k: 0 for k in SIMLA_PARTS}, "xmm_image": want}, (side, diff)


def test_paper_size_single_stream_config_is_built_at_size_when_files_are_missing():
    """simla_4m.yaml names a DeiT file, a bert-base-uncased dir and the DALL-E dVAE file that a fresh checkout lacks:
    counted at their sizes (random init), the dVAE stand-in with the DALL-E encoder's size and vocabulary (so the
    MIM head is 768 x 8192 and the tokenizer's forward is the real one). Checked without building the model."""
    from train.flops import DALLE_DVAE, prepare_model_config, prepare_objectives

    cfg = load_config(str(Path(SIMLA_TINY).parent / "simla_4m.yaml"))
    notes = []
    model_cfg, tok = prepare_model_config(cfg, log=notes.append)
    assert model_cfg.family == "single_stream" and model_cfg.vision.pretrained is None
    t = model_cfg.text
    assert (t.pretrained, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.vocab_size) == \
        (None, 768, 12, 12, 3072, 30522) and len(tok) == 30522
    objectives, stand_ins = prepare_objectives(dict(cfg.objectives), log=notes.append)
    assert stand_ins == {"xmm_image": DALLE_DVAE} == {"xmm_image": {"hidden": 256, "blocks_per_group": 2,
                                                                    "vocab_size": 8192}}
    x = objectives["xmm_image"]
    assert x.tokenizer is None and x.random_tokenizer.vocab_size == 8192
    assert objectives["itm"] == cfg.objectives["itm"] and objectives["itm"].pairs == "3b"
    assert len(notes) == 3 and "its forward on the tokenizer view is counted" in notes[2]
    # the stand-in: a frozen random dVAE of those sizes, outside the module tree (so never saved or trained)
    from train.flops import image_tokenizers, swap_tokenizers
    from models.text import load_tokenizer
    from models.vlp import build_model
    tiny = load_config(SIMLA_TINY)
    model = build_model(tiny.model, dict(tiny.objectives), load_tokenizer(tiny.model.text))
    before = set(model.state_dict())
    swap_tokenizers(model, {"xmm_image": {"hidden": 8, "blocks_per_group": 2, "vocab_size": 64}})
    (name, dvae), = image_tokenizers(model).items()
    assert name == "xmm_image" and dvae.sizes() == {"hidden": 8, "blocks_per_group": 2, "vocab_size": 64,
                                                    "in_channels": 3}
    assert not any(p.requires_grad for p in dvae.parameters()) and set(model.state_dict()) == before
    # the DALL-E encoder at 128 px: about 68 GFLOPs per image
    assert _dvae_forward(256, 2, 8192, 128) == pytest.approx(68.07e9, rel=1e-3)


def test_single_stream_script_names_the_tokenizer_and_ends_with_the_ratio(capsys):
    assert main(["--config", SIMLA_TINY, "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "the released SIMLA code" in out
    assert re.search(r"xmm_image includes its image tokenizer's forward \(dVAE, no gradient\): [0-9.]+ GFLOPs", out)
    m = re.fullmatch(r"ratio: ([0-9.]+)", out.strip().splitlines()[-1])
    assert m and 0.5 < float(m.group(1)) < 1
