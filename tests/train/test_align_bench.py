"""ALIGN-BENCH scoring (train/align_bench.py): the math against independent re-computations, cross- (not self-)
attention of the last layer, >90% boxes skipped in global, videos per frame, the CLI end to end, the pretraining
evaluation hook."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY, data_overrides, write_ds_config

CAPTION = "A dog sits on a bookshelf near the red sofa."


def write_item(root, key, caption, annotation, size):
    h, w = size
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "pkls"), exist_ok=True)
    rng = np.random.default_rng(int(key))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "images", f"{key}.jpg"))
    with open(os.path.join(root, "pkls", f"{key}.pkl"), "wb") as f:
        pickle.dump({"caption": caption, "annotation": annotation}, f)


def region(box, size, pixel_rect=None):
    h, w = size
    m = np.zeros((h, w), bool)
    x1, y1, x2, y2 = pixel_rect or box
    m[y1:y2, x1:x2] = True
    m[y1, x1] = False   # pixel masks differ from their boxes
    return {"bbox_mask": list(box), "pixel_mask": m}


# item -> (size, {phrase: [(box, pixel rect or None)]})
ITEMS = {
    "0": ((40, 60), {"dog": [((10, 5, 30, 20), (12, 6, 25, 18))],
                     "bookshelf": [((40, 2, 58, 30), None), ((0, 30, 10, 40), None)]}),
    "1": ((50, 50), {"red sofa": [((0, 0, 50, 50), (0, 0, 20, 20))],      # background box (100% of the image)
                     "dog": [((5, 25, 45, 45), None)]}),
    "2": ((30, 70), {"sofa": [((30, 10, 70, 30), None)]}),
    "3": ((40, 40), {"red sofa": [((1, 1, 39, 39), None)]}),               # only background: no global score
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_bench")
    for key, (size, ann) in ITEMS.items():
        write_item(root, key, CAPTION, {p: [region(b, size, r) for b, r in regs] for p, regs in ann.items()}, size)
    return str(root)


@pytest.fixture(scope="module")
def tiny():
    from train import convert_checkpoint as cc
    from train.config import config_to_dict, load_config

    config = config_to_dict(load_config(TINY, []))
    model = cc.build_from_config(config).eval()
    from models.text import load_tokenizer
    return model, config, load_tokenizer(model.cfg.text)


def _reader(bench, tiny):
    from train.align_bench import make_reader
    model, config, tok = tiny
    return make_reader(bench, tok, model, config["data"])


def _run(bench, tiny, batch_size=3):
    from datasets.batch import to_device
    from train.align_bench import read_items, run_items, summarize
    model = tiny[0]
    items, skipped = read_items(_reader(bench, tiny))
    records, _ = run_items(model, items, lambda b: to_device(b, "cpu", torch.float32), batch_size, "clip")
    return items, records, summarize(records, skipped)


# ------------------------------------------------------------------------- independent reference
def ref_grid_mask(regions, size, pixel, skip_background):
    """The released procedure in plain loops: union at the original size, bicubic to 4 x 4, clamped."""
    h, w = size
    m = np.zeros((h, w), np.float32)
    for box, rect in regions:
        x1, y1, x2, y2 = box
        if skip_background and (y2 - y1) * (x2 - x1) > 0.9 * w * h:
            continue
        if pixel:
            px1, py1, px2, py2 = rect or box
            for y in range(py1, py2):
                for x in range(px1, px2):
                    if (y, x) != (py1, px1):
                        m[y, x] = 1
        else:
            m[y1:y2, x1:x2] = 1
    t = F.interpolate(torch.from_numpy(m)[None, None], size=(4, 4), mode="bicubic", antialias=True)
    return t[0, 0].clamp(0, 1).double()


def ref_attention(model, tok, root, key):
    """Last-layer text->image cross-attention for one item, through the fusion's own returned maps, reduced with
    loops: max over heads, the CLS column (index 0) dropped, patches row-major on the 4 x 4 grid."""
    from datasets.transforms import MEAN_STD
    with Image.open(f"{root}/images/{key}.jpg") as im:   # the whole image squashed to 64 x 64 (uint8 bicubic)
        a = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None]
    x = F.interpolate(a, size=(64, 64), mode="bicubic", antialias=True).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in MEAN_STD["clip"])
    x = ((x - mean) / std)[:, None]
    enc = tok(CAPTION, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        p = model.fuse(txt, enc["attention_mask"], img, return_attention=True).text_to_image_attentions[-1][0]
    heads, lt, nv = p.shape
    out = torch.zeros(lt, 4, 4, dtype=torch.float64)
    for t in range(lt):
        for j in range(1, nv):
            out[t, (j - 1) // 4, (j - 1) % 4] = max(float(p[hd, t, j]) for hd in range(heads))
    return out, enc


def ref_word_tokens(enc, phrase):
    """Token positions of `phrase` from the fast tokenizer's own word ids (not our merging)."""
    words = [wd.strip(".").lower() for wd in CAPTION.split()]
    pw = phrase.split()
    start = next(i for i in range(len(words)) if words[i:i + len(pw)] == pw)
    wid = enc.word_ids(0)
    return [i for i, x in enumerate(wid) if x is not None and start <= x < start + len(pw)]


def ratio(att, mask):
    return float((att * mask).sum() / att.sum())


def test_scores_match_an_independent_computation(bench, tiny):
    model, _, tok = tiny
    items, records, result = _run(bench, tiny)
    assert [r["key"] for r in records] == ["0", "1", "2", "3"]
    gb, gp, lb, lp = [], [], [], []
    multi_piece = False
    for key, (size, ann) in ITEMS.items():
        att, enc = ref_attention(model, tok, bench, key)
        regs = [r for rs in ann.values() for r in rs]
        gbox, gpix = ref_grid_mask(regs, size, False, True), ref_grid_mask(regs, size, True, True)
        rec = records[int(key)]
        if gbox.sum() > 0:
            assert rec["global_box"] == pytest.approx(ratio(att[0], gbox), abs=2e-4)
            assert rec["global_pixel"] == pytest.approx(ratio(att[0], gpix), abs=2e-4)
            gb.append(ratio(att[0], gbox))
            gp.append(ratio(att[0], gpix))
        else:
            assert rec["global_box"] is None
        pb, pp = [], []
        for phrase, rs in ann.items():
            toks = ref_word_tokens(enc, phrase)
            multi_piece |= len(toks) > len(phrase.split())
            m = att[toks].sum(0)
            pb.append(ratio(m, ref_grid_mask(rs, size, False, False)))
            pp.append(ratio(m, ref_grid_mask(rs, size, True, False)))
            assert rec["phrases"][phrase] == pytest.approx((pb[-1], pp[-1]), abs=2e-4)
        lb.append(np.mean(pb))
        lp.append(np.mean(pp))
    assert multi_piece   # "bookshelf" is several WordPiece tokens: the merge is exercised
    assert result["align_items"] == 4 and result["align_skipped"] == {"background_only": 1}
    for k, v in (("global_box", gb), ("global_pixel", gp), ("local_box", lb), ("local_pixel", lp)):
        assert result[f"align_{k}"] == pytest.approx(np.mean(v), abs=2e-4)
    # batching does not change anything
    _, _, one = _run(bench, tiny, batch_size=1)
    for k in ("align_global_box", "align_local_pixel"):
        assert one[k] == pytest.approx(result[k], abs=1e-5)


def test_background_boxes_are_skipped_in_global(bench, tiny):
    """Item 1: its 'red sofa' box covers the whole image; counting it would change the global score."""
    model, _, tok = tiny
    _, records, _ = _run(bench, tiny)
    size, ann = ITEMS["1"]
    att, _ = ref_attention(model, tok, bench, "1")
    regs = [r for rs in ann.values() for r in rs]
    with_bg = ratio(att[0], ref_grid_mask(regs, size, False, False))
    without = ratio(att[0], ref_grid_mask(regs, size, False, True))
    assert abs(with_bg - without) > 1e-3
    assert records[1]["global_box"] == pytest.approx(without, abs=2e-4)


def test_last_layer_cross_attention_is_what_is_read(bench, tiny, monkeypatch):
    """The last layer's text cross-attention probabilities are replaced by a known tensor: head 1 puts all of every
    row on patch (0, 0), head 0 puts 0.5 on the CLS column and 0.5 on patch (3, 3). After max over heads and dropping
    CLS the map is 1 at (0, 0) and 0.5 at (3, 3), whatever the inputs: self-attention, another layer, the mean over
    heads or a kept CLS column give other numbers."""
    from models.fusion import Attention
    model = tiny[0]
    target = model.fusion.layers[-1].text.cross_attn
    orig = Attention.forward

    def fake(self, x, context, key_mask, return_attention=False):
        out, probs = orig(self, x, context, key_mask, return_attention)
        if self is target and return_attention:
            probs = torch.zeros_like(probs)
            probs[:, 1, :, 1] = 1.0
            probs[:, 0, :, 0] = 0.5
            probs[:, 0, :, 16] = 0.5
        return out, probs
    monkeypatch.setattr(Attention, "forward", fake)
    items, records, result = _run(bench, tiny)
    for item, rec in zip(items, records):
        def expect(mask):
            return float((mask[0, 0] * 1.0 + mask[3, 3] * 0.5) / 1.5)
        if item.global_box is not None:
            assert rec["global_box"] == pytest.approx(expect(item.global_box), abs=1e-6)
            assert rec["global_pixel"] == pytest.approx(expect(item.global_pixel), abs=1e-6)
        for p in item.phrases:
            assert rec["phrases"][p.text] == pytest.approx((expect(p.box), expect(p.pixel)), abs=1e-6)
    # item 0's dog box reaches grid cell (0, 0) partly and (3, 3) not at all
    assert 0 < records[0]["phrases"]["dog"][0] < 1


def test_two_frames_scored_per_frame_and_averaged(bench, tiny):
    from datasets.align_bench import resize_mask
    from train.align_bench import cross_attention_maps, score_item
    model, _, tok = tiny
    items, _, _ = _run(bench, tiny)
    item = items[0]
    g = torch.Generator().manual_seed(0)
    att = torch.rand(24, 2, 4, 4, generator=g)
    rec = score_item(item, att)
    per_frame = [ratio(att[0, f].double(), item.global_box.double()) for f in range(2)]
    assert abs(per_frame[0] - per_frame[1]) > 1e-3
    assert rec["global_box"] == pytest.approx(np.mean(per_frame), abs=1e-9)
    # the model's 2-frame maps: frame f's grid is columns F + f * P .. of the returned probabilities
    x = torch.randn(1, 2, 3, 64, 64, generator=g)
    ids, mask = item.input_ids[None], item.attention_mask[None]
    with torch.no_grad():
        maps = cross_attention_maps(model, x, ids, mask)
        p = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(x),
                       return_attention=True).text_to_image_attentions[-1][0].amax(0)
    assert maps.shape == (1, 24, 2, 4, 4)
    assert torch.allclose(maps[0, :, 1, 2, 3], p[:, 2 + 16 + 2 * 4 + 3])
    assert resize_mask(torch.ones(5, 7), (4, 4)).min() == 1


def test_cli_end_to_end_and_bad_arguments(bench, tiny, tmp_path, capsys):
    from models.weights import save_weights
    from train import align_bench as ab
    model, config, _ = tiny
    ckpt = str(tmp_path / "model.safetensors")
    save_weights(model.state_dict(), ckpt, {"kind": "vlp", "config": config})
    out = tmp_path / "out"
    assert ab.main(["--checkpoint", ckpt, "--data", bench, "--out", str(out), "--visualize", "2", "--quiet",
                    "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "global  box" in printed and "local   box" in printed
    res = json.loads((out / "align_bench.json").read_text())
    assert set(ab.KEYS) <= set(res) and res["align_items"] == 4
    assert res["align_global_box"] == pytest.approx(_run(bench, tiny)[2]["align_global_box"], abs=1e-6)
    pngs = sorted(os.listdir(out / "vis"))
    assert pngs == ["0.png", "1.png"] and all((out / "vis" / p).stat().st_size > 1000 for p in pngs)
    assert ab.main(["--checkpoint", ckpt, "--data", bench, "--quiet"]) == 0   # default out: beside the file
    assert (tmp_path / "align_bench" / "align_bench.json").is_file()
    capsys.readouterr()

    text_file = str(tmp_path / "text.safetensors")
    save_weights({"x": torch.zeros(1)}, text_file, {"kind": "text"})
    for argv in (["--checkpoint", ckpt, "--data", str(tmp_path / "nope")],
                 ["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", bench],
                 ["--checkpoint", text_file, "--data", bench],
                 ["--checkpoint", ckpt, "--data", bench, "--visualize", "-1"],
                 ["--checkpoint", ckpt],
                 ["--checkpoint", ckpt, "--data", bench, "--batch-size", "x"]):
        assert ab.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)


def test_pretraining_eval_hook_writes_the_keys(bench, demo_shards, tmp_path):
    from train import pretrain as entry
    from train.align_bench import KEYS
    from train.config import ConfigError

    ds = write_ds_config(tmp_path, 0, "fp32")
    args = ["--deepspeed_config", ds, "--config", TINY, "--output_dir", str(tmp_path / "run"),
            *data_overrides(demo_shards), "train.max_steps=2"]
    with pytest.raises(ConfigError, match="data.align_bench"):
        entry.prepare(args + [f"data.align_bench={tmp_path / 'missing'}"])
    cfg, ds_cfg = entry.prepare(args + [f"data.align_bench={bench}"])
    entry.run(cfg, ds_cfg)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(KEYS) <= set(ev) and "i2t_r1" in ev
    assert ev["align_items"] == 4 and ev["align_skipped"] == {"background_only": 1}
    assert all(0 <= ev[k] <= 1 for k in KEYS[:4])
    # the CLI on the run dir (DeepSpeed checkpoint of step 2, the weights the evaluation saw) gives the same scores
    from train import align_bench as ab
    assert ab.main(["--checkpoint", str(tmp_path / "run"), "--data", bench, "--quiet"]) == 0
    cli = json.loads((tmp_path / "run" / "align_bench" / "align_bench.json").read_text())
    for k in KEYS[:4]:
        assert cli[k] == pytest.approx(ev[k], abs=1e-5)
