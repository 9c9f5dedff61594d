"""RandAugment, JPEG draft decoding, MLM masking in the collator, multi-source eval, config checks."""
import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import functools
import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets.config import DataConfig, RandAugmentConfig, SourceConfig  # noqa: E402
from datasets.loader import build_eval_loader, build_train_loader  # noqa: E402
from datasets.transforms import ImageTransform  # noqa: E402


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _jpeg(w, h, seed=0, quality=90):
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (230, 230, 220))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - w // 4)), int(rng.integers(0, h - h // 4))
        d.ellipse([x0, y0, x0 + w // 5, y0 + h // 5], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=quality)
    return b.getvalue(), im


def _unnorm(x, kind="clip"):
    return x.float() / 255  # transforms hand out uint8; normalisation happens on the device


def test_randaugment_deterministic_per_sample_and_leaves_torch_rng_alone():
    data, _ = _jpeg(96, 80)
    plain = ImageTransform(48, (0.5, 1.0), False, "clip", True)
    ra = ImageTransform(48, (0.5, 1.0), False, "clip", True, RandAugmentConfig(num_ops=2, magnitude=9))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    outs = [ra(data, random.Random(s)) for s in range(8)]
    assert torch.equal(torch.get_rng_state(), before)  # model-side randomness is untouched
    again = [ra(data, random.Random(s)) for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    # the crop is drawn first from the same rng, so any difference from the plain transform is RandAugment's
    differs = sum(not torch.equal(a, plain(data, random.Random(s))) for s, a in enumerate(outs))
    assert differs >= 6
    assert len({o.sum().item() for o in outs}) >= 6  # different samples get different ops
    eval_tf = ImageTransform(48, (0.5, 1.0), False, "clip", False, RandAugmentConfig())
    assert eval_tf.randaug is None  # never at eval


def test_large_jpeg_draft_decode_matches_full_decode():
    data, im = _jpeg(1024, 768, quality=95)
    out = _unnorm(ImageTransform(64, (1.0, 1.0), False, "clip", False)(data, None)[0])
    # independent reference: full-size decode, central square, then one bicubic resize
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = full.resize((64, 64), Image.BICUBIC, box=(128, 0, 896, 768))
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
    assert out.shape == (3, 64, 64)
    assert (out - ref).abs().mean() < 0.02, (out - ref).abs().mean()


def _bert_masker(tok, probability):
    """What train/pretrain.py hands the loader when data.mlm_probability is set."""
    from models.masking import bert_mask
    return functools.partial(bert_mask, special_ids=torch.tensor(sorted(set(tok.all_special_ids))),
                             mask_token_id=tok.mask_token_id, vocab_size=len(tok), probability=probability)


def test_mlm_masking_in_collator(demo, tok):
    cfg = DataConfig(train=[SourceConfig(demo["paths"]["train_images"])], image_size=32, num_workers=0,
                     shuffle_buffer=20, max_text_len=24, mlm_probability=0.3)
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=8, rank=0, world_size=1, seed=0,  # noqa: E731
                                    text_masker=_bert_masker(tok, 0.3))
    batches = _take(mk(), 30)
    special = torch.tensor(tok.all_special_ids)
    eligible = picked = to_mask = kept = 0
    for b in batches:
        ids, am, mids, lab = b["input_ids"], b["attention_mask"], b["mlm_input_ids"], b["mlm_labels"]
        assert mids.shape == lab.shape == ids.shape and mids.dtype == lab.dtype == torch.long
        m = lab != -100
        can = am.bool() & ~torch.isin(ids, special)
        assert not (m & ~can).any()  # never special tokens or padding
        assert torch.equal(lab[m], ids[m]) and torch.equal(mids[~m], ids[~m])
        eligible += int(can.sum())
        picked += int(m.sum())
        to_mask += int((mids[m] == tok.mask_token_id).sum())
        kept += int((mids[m] == ids[m]).sum())
        assert not torch.isin(mids[m & (mids != tok.mask_token_id)], special).any()  # random tokens are words
    assert 0.25 < picked / eligible < 0.35
    assert 0.74 < to_mask / picked < 0.86 and 0.05 < kept / picked < 0.16
    again = _take(mk(), 3)
    assert all(torch.equal(a["mlm_input_ids"], b["mlm_input_ids"]) for a, b in zip(again, batches))
    assert "mlm_labels" not in _take(build_train_loader(DataConfig(**{**cfg.__dict__, "mlm_probability": None}),
                                                        tok, micro_batch_size=8, rank=0, world_size=1, seed=0), 1)[0]
    with pytest.raises(ValueError, match="data.mlm_probability is set but build_train_loader got no text_masker"):
        build_train_loader(cfg, tok, micro_batch_size=8, rank=0, world_size=1, seed=0)


def test_randaugment_through_loader_resumes(demo, tok):
    cfg = DataConfig(train=[SourceConfig(demo["paths"]["train_images"])], image_size=32, num_workers=2,
                     shuffle_buffer=20, max_text_len=16, randaugment={"num_ops": 2, "magnitude": 9})
    mk = lambda: build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0)  # noqa: E731
    ref = _take(mk(), 9)
    first = mk()
    _take(first, 5)
    resumed = mk()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(_take(resumed, 4), ref[5:]))


def test_eval_batches_never_mix_sources(demo, tok):
    cfg = DataConfig(eval=[SourceConfig(demo["paths"]["val_images"]),
                           SourceConfig(demo["paths"]["val_videos"], "video")],
                     image_size=32, num_frames=3, max_text_len=16)
    batches = list(build_eval_loader(cfg, tok, batch_size=16))
    per_source = {0: 0, 1: 0}
    for b in batches:
        per_source[b["source"]] += len(b["__key__"])
        assert b["modality"] == ("image" if b["source"] == 0 else "video")
        assert b["pixel_values"].shape[1] == (1 if b["source"] == 0 else 3)
    assert per_source == {0: demo["args"]["val_images"], 1: demo["args"]["val_videos"]}
    assert [b["source"] for b in batches] == sorted(b["source"] for b in batches)


@pytest.mark.parametrize("field,value", [("randaugment", {"num_ops": 2, "magnitude": 40}),
                                         ("mlm_probability", 1.5), ("max_bad_fraction", -0.1),
                                         ("bad_check_min_samples", 0), ("resampled", "yes")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value}).validate()
