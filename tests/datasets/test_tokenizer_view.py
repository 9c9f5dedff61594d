"""data.tokenizer_view: the dVAE's second view of each train image (SIMLA / BEiT masked image modelling). Shared
crop = the encoder view's box and flip at the tokenizer's size (checked against a PIL decode + crop computed here);
independent = its own draw; deterministic, resumable, uint8 in the batch and float32 [0, 1] after to_device."""
import io
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from datasets import batch as K
from datasets.config import DataConfig, RandAugmentConfig, SourceConfig, TokenizerViewConfig
from datasets.loader import build_eval_loader, build_train_loader
from datasets.shards import expand_shards, raw_samples
from datasets.transforms import ImageTransform, random_resized_crop_box
from train.config import ConfigError, build_dataclass

SCALE = (0.2, 1.0)


def _cfg(demo, tv, **kw):
    base = dict(train=[SourceConfig(demo["paths"]["train_images"])], eval=[SourceConfig(demo["paths"]["val_images"])],
                image_size=32, num_workers=0, shuffle_buffer=10, max_text_len=16, crop_scale=list(SCALE), hflip=True,
                tokenizer_view=tv)
    base.update(kw)
    return DataConfig(**base)


def _take(cfg, tok, n, state=None, seed=3):
    loader = build_train_loader(cfg, tok, micro_batch_size=8, rank=0, world_size=1, seed=seed)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    return [next(it) for _ in range(n)], loader


def _by_hand(data: bytes, box, flip: bool, size: int) -> torch.Tensor:
    """PIL full decode, crop `box`, torch's antialiased uint8 bicubic resize (as the transform), flip: (3, s, s)."""
    a = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    top, left, ch, cw = box
    x = a[top:top + ch, left:left + cw].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return x.flip(-1) if flip else x


def _draw(data: bytes, seed: int, scale=SCALE):
    """The encoder view's box and flip, re-drawn from the sample rng with the public helper."""
    w, h = Image.open(io.BytesIO(data)).size
    rng = random.Random(seed)
    return random_resized_crop_box(h, w, scale, rng), rng.random() < 0.5


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def _texture_jpeg(w=640, h=480) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 50.0), 128 + 100 * np.sin(yy / 40.0),
                    128 + 100 * np.sin((xx + 2 * yy) / 90.0)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def pil_loads(monkeypatch):
    """The sizes PIL decodes pixels at (ImageFile.load), i.e. after any JPEG draft reduction."""
    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real(self))
    return calls


def test_shared_view_is_the_encoder_crop_at_the_tokenizer_size(demo):
    """Demo JPEGs (no draft reduction): bit-equal to PIL decode + the same box and flip, resized to s."""
    tf = ImageTransform(32, SCALE, True, "clip", train=True, tokenizer_view=TokenizerViewConfig(16))
    plain = ImageTransform(32, SCALE, True, "clip", train=True)
    samples = [s for _, s in zip(range(12), raw_samples(expand_shards(demo["paths"]["train_images"])))]
    flips = set()
    for seed, smp in enumerate(samples):
        x, t = tf(smp["jpg"], random.Random(seed))
        assert x.shape == (1, 3, 32, 32) and t.shape == (3, 16, 16) and t.dtype == torch.uint8
        box, flip = _draw(smp["jpg"], seed)
        flips.add(flip)
        assert torch.equal(t, _by_hand(smp["jpg"], box, flip, 16)), seed
        assert torch.equal(x[0], _by_hand(smp["jpg"], box, flip, 32))  # the encoder view: same box, same flip
        assert torch.equal(x, plain(smp["jpg"], random.Random(seed)))  # and unchanged by the tokenizer view
    assert flips == {False, True}


def test_shared_view_after_jpeg_draft_keeps_resolution_for_the_larger_view(pil_loads):
    """A large JPEG is decoded at a reduced scale once for both views: the tokenizer view still matches the full
    decode closely and is far from another crop; a tokenizer view larger than the encoder view limits the reduction
    so that its crop keeps at least s x s decoded pixels."""
    jpg = _texture_jpeg()
    for size, tsize, scale in ((64, 32, (0.5, 1.0)), (32, 128, (0.9, 1.0))):
        tf = ImageTransform(size, scale, True, "clip", train=True, tokenizer_view=TokenizerViewConfig(tsize))
        for seed in range(6):
            pil_loads.clear()
            x, t = tf(jpg, random.Random(seed))
            (dw, dh), = set(pil_loads)
            assert dw < 640 and dh < 480  # the draft path is exercised
            box, flip = _draw(jpg, seed, scale)
            assert box[3] * dw / 640 >= tsize and box[2] * dh / 480 >= tsize  # enough decoded pixels for t
            assert _mad(t, _by_hand(jpg, box, flip, tsize)) < 6, (size, tsize, seed)  # draft: box rounding, DCT scaling
            other = (box[0], max(0, box[1] - 60), box[2], box[3]) if box[1] >= 30 else \
                (box[0], box[1] + 60, box[2], min(box[3], 640 - box[1] - 60))
            assert _mad(t, _by_hand(jpg, other, flip, tsize)) > 15, (size, tsize, seed)
            assert _mad(t, _by_hand(jpg, box, not flip, tsize)) > 15


def test_loader_shared_and_independent_views(demo, tok):
    """Same stream, three configs: the encoder views are identical (the tokenizer draws come last); shared ~= the
    encoder view downscaled; independent is another crop for most samples; both repeat across runs (2 workers)."""
    base, _ = _take(_cfg(demo, None), tok, 4)
    shared, _ = _take(_cfg(demo, TokenizerViewConfig(16)), tok, 4)
    indep, _ = _take(_cfg(demo, TokenizerViewConfig(16, "independent")), tok, 4)
    near, far = [], []
    for b, s, i in zip(base, shared, indep):
        assert K.TOKENIZER_PIXELS not in b
        assert b["__key__"] == s["__key__"] == i["__key__"]
        assert torch.equal(b[K.PIXEL_VALUES], s[K.PIXEL_VALUES]) and torch.equal(b[K.PIXEL_VALUES], i[K.PIXEL_VALUES])
        down = F.interpolate(s[K.PIXEL_VALUES][:, 0].float(), size=(16, 16), mode="bicubic", align_corners=False,
                             antialias=True)
        near += [_mad(d, t) for d, t in zip(down, s[K.TOKENIZER_PIXELS])]
        far += [_mad(d, t) for d, t in zip(down, i[K.TOKENIZER_PIXELS])]
    # resampling twice (crop -> 32 -> 16 vs crop -> 16) costs a few levels on small noisy crops; another crop far more
    assert np.mean(near) < 1.5 and max(near) < 6, near
    assert np.mean([d > 3 for d in far]) >= 0.8 and np.mean(far) > 8, far
    for tv in (TokenizerViewConfig(16, "independent"), TokenizerViewConfig(16)):
        cfg = _cfg(demo, tv, num_workers=2)
        a, _ = _take(cfg, tok, 6)
        b, _ = _take(cfg, tok, 6)
        assert all(torch.equal(x[K.TOKENIZER_PIXELS], y[K.TOKENIZER_PIXELS]) for x, y in zip(a, b))


def test_batch_dtype_and_to_device(demo, tok):
    cfg = _cfg(demo, TokenizerViewConfig(24))
    (b,), _ = _take(cfg, tok, 1)
    t = b[K.TOKENIZER_PIXELS]
    assert set(b) == K.keys_of(K.TRAIN, K.TOKENIZER_VIEW)
    assert t.dtype == torch.uint8 and t.shape == (8, 3, 24, 24) and t.max() > 1  # raw pixels, not normalised
    out = K.to_device(b, torch.device("cpu"), torch.bfloat16)
    assert out[K.PIXEL_VALUES].dtype == torch.bfloat16
    assert out[K.TOKENIZER_PIXELS].dtype == torch.float32  # never bf16: the codes are an argmax
    assert 0 <= out[K.TOKENIZER_PIXELS].min() and out[K.TOKENIZER_PIXELS].max() <= 1
    torch.testing.assert_close(out[K.TOKENIZER_PIXELS], t.double().div(255).float(), rtol=0, atol=1e-7)
    ev = next(iter(build_eval_loader(cfg, tok, batch_size=4)))
    assert set(ev) == K.keys_of(K.EVAL)  # eval batches do not carry it


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_stream_gives_identical_tokenizer_pixels(demo, tok, workers):
    cfg = _cfg(demo, TokenizerViewConfig(16, "independent", randaugment=True), num_workers=workers,
               randaugment=RandAugmentConfig(2, 9))
    ref, _ = _take(cfg, tok, 14)
    head, first = _take(cfg, tok, 9)
    state = json.loads(json.dumps(first.state_dict()))
    tail, _ = _take(cfg, tok, 5, state)
    for i, (x, y) in enumerate(zip(head + tail, ref)):
        assert x["__key__"] == y["__key__"], i
        assert torch.equal(x[K.PIXEL_VALUES], y[K.PIXEL_VALUES]), i
        assert torch.equal(x[K.TOKENIZER_PIXELS], y[K.TOKENIZER_PIXELS]), i


def test_bad_samples_skipped_and_counted(demo, tok, tmp_path):
    import webdataset as wds

    good = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in raw_samples(expand_shards(demo["paths"]["val_images"]))][:12]
    good[2]["jpg"] = good[2]["jpg"][: len(good[2]["jpg"]) // 3]  # truncated JPEG
    good[5]["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    shard = str(tmp_path / "broken-00000.tar")
    with wds.TarWriter(shard, encoder=False) as tw:
        for s in good:
            tw.write(s)
    cfg = _cfg(demo, TokenizerViewConfig(16), train=[SourceConfig(shard)], shuffle_buffer=0)
    loader = build_train_loader(cfg, tok, micro_batch_size=5, rank=0, world_size=1, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(2)]
    assert all(b[K.TOKENIZER_PIXELS].shape == (5, 3, 16, 16) for b in batches)
    assert {k for b in batches for k in b["__key__"]} == {s["__key__"] for j, s in enumerate(good) if j not in (2, 5)}
    assert loader.stats()["bad_by_reason"] == {"bad_image": 2}


@pytest.mark.parametrize("tv, extra, match", [
    ({"size": 12}, {}, r"^data\.tokenizer_view\.size must be an int >= 8 and a multiple of 8"),
    ({"size": 0}, {}, r"^data\.tokenizer_view\.size must be an int >= 8"),
    ({"size": True}, {}, r"^data\.tokenizer_view\.size: expected int"),
    ({}, {}, r"^data\.tokenizer_view\.size: missing required key"),
    ({"size": 16, "crop": "same"}, {}, r"^data\.tokenizer_view\.crop: expected one of 'shared', 'independent'"),
    ({"size": 16, "randaugment": True}, {}, r"^data\.tokenizer_view\.randaugment: true needs data\.randaugment"),
    ({"size": 16}, {"video": True}, r"^data\.tokenizer_view: .*image-only.*data\.train\[1\] is a video source"),
])
def test_config_errors_are_one_line_naming_the_key(tv, extra, match):
    train = [{"shards": "a.tar"}] + ([{"shards": "v.tar", "modality": "video"}] if extra.get("video") else [])
    with pytest.raises(ConfigError, match=match) as e:
        build_dataclass(DataConfig, {"train": train, "tokenizer_view": tv}, "data")
    assert "\n" not in str(e.value)
    ok = build_dataclass(DataConfig, {"train": train[:1], "tokenizer_view": {"size": 128, "crop": "independent"}},
                         "data")
    assert ok.tokenizer_view == TokenizerViewConfig(128, "independent", False)
    assert math.isclose(ok.tokenizer_view.size / 8, 16)
