"""The options that make the released SCL/GLSCL code's behaviour expressible (README "Parity with the released code"):
each one checked against what the released code does, written out here."""
import dataclasses
import math

import pytest
import torch

from conftest import make_batch, tiny_config
from models.backbone import ContrastiveHead, ContrastiveHeadConfig
from models.masking import official_mlm_mask
from models.objectives.glscl import MltcConfig
from models.objectives.itm import ItmConfig
from models.objectives.mlm import MlmConfig, build_masker
from models.vision import VisionConfig, VisionEncoder
from models.vlp import build_model


def test_raw_temperature_divides_unclamped_like_cl_temp():
    head = ContrastiveHead(ContrastiveHeadConfig(embed_dim=8, parameterization="raw"), 16)
    assert "temperature" in dict(head.named_parameters()) and "log_inv_temperature" not in dict(head.named_parameters())
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    for value in (0.07, 1e-4, 3.0):   # outside the log parameterisation's [0.01, 0.5]: not clamped
        with torch.no_grad():
            head.temperature.fill_(value)
        zi, zt, tau = head(x, x)
        assert tau.item() == pytest.approx(value, rel=1e-6)
    # d(loss)/d(tau) of loss = sum(s / tau) is -sum(s) / tau^2: tau itself is the parameter (no exp/log in between)
    with torch.no_grad():
        head.temperature.fill_(0.5)
    zi, zt, tau = head(x, x)
    s = (zi @ zt.T).sum()
    (s / tau).backward()
    assert head.temperature.grad.item() == pytest.approx(-s.item() / 0.25, rel=1e-5)
    # the default keeps log(1/tau), clamped to [min, max]
    log_head = ContrastiveHead(ContrastiveHeadConfig(embed_dim=8), 16)
    with torch.no_grad():
        log_head.log_inv_temperature.fill_(math.log(1 / 1e-4))
    assert log_head(x, x)[2].item() == pytest.approx(0.01, rel=1e-5)


def _vision(**kw):
    return VisionEncoder(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1,
                                      num_heads=3, **kw))


def test_temporal_embedding_on_images_adds_row_zero():
    torch.manual_seed(0)
    ours, released = _vision(), _vision(temporal_embed_images=True)
    released.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.temporal_embed.normal_()
        released.temporal_embed.copy_(ours.temporal_embed)
    img = torch.randn(2, 1, 3, 32, 32)
    # every token of the image (its CLS included) gets exactly row 0 on top of the spatial embedding
    diff = released.embed(img) - ours.embed(img)
    torch.testing.assert_close(diff, ours.temporal_embed[:, :1, None].expand_as(diff), rtol=0, atol=1e-6)
    vid = torch.randn(2, 3, 3, 32, 32)
    torch.testing.assert_close(released.embed(vid), ours.embed(vid), rtol=0, atol=0)   # videos: unchanged
    # with the option, an image is embedded exactly as frame 0 of a video
    torch.testing.assert_close(released.embed(vid[:, :1]), released.embed(vid)[:, :1], rtol=0, atol=0)


def test_temporal_init_std_null_is_width_to_the_minus_half():
    torch.manual_seed(0)
    table = VisionEncoder(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=768, depth=1,
                                       num_heads=12, temporal_init_std=None)).temporal_embed
    assert table.std().item() == pytest.approx(768 ** -0.5, rel=0.05)   # 6144 draws: within 5% of the released
    torch.manual_seed(0)
    assert _vision().temporal_embed.std().item() == pytest.approx(0.02, rel=0.2)


def test_itm_released_negatives_replace_the_image_only(tokenizer):
    """negative_side: image: B - B//2 rows keep their own text and get another sample's image, the rest stay
    positive; the loss is the cross entropy of the ITM head on exactly that labelling."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), {"itm": ItmConfig(pairs="b", hard_negatives=False, negative_side="image")},
                        tokenizer).eval()
    batch = make_batch(tokenizer, b=5)
    seen = {}
    fuse = model.fuse

    def recording(text, mask, image, **kw):
        seen["text"], seen["image"] = text, image.tokens
        return fuse(text, mask, image, **kw)

    model.fuse = recording
    model.itm_head.register_forward_hook(lambda m, a, out: seen.setdefault("logits", out))
    out = model(batch)
    text, image = model.encode_text(batch["input_ids"], batch["attention_mask"]), model.encode_image(
        batch["pixel_values"]).tokens
    torch.testing.assert_close(seen["text"], text)   # every row keeps its own text
    same = torch.stack([(seen["image"][i] == image[i]).all() for i in range(5)])
    assert int((~same).sum()) == 5 - 5 // 2   # B - B//2 negatives, as the released compute_itm
    for i in torch.nonzero(~same).flatten().tolist():   # a negative's image is another sample's image
        assert any((seen["image"][i] == image[j]).all() for j in range(5) if j != i)
    labels = same.long()
    expected = torch.nn.functional.cross_entropy(seen["logits"].float(), labels)
    torch.testing.assert_close(out["losses"]["itm"], expected)
    with pytest.raises(ValueError, match="negative_side"):
        ItmConfig(negative_side="image").validate()   # needs pairs: b


def _official_tables(vocab, continuation=(), skipped=()):
    cont = torch.zeros(vocab, dtype=torch.bool)
    skip = torch.zeros(vocab, dtype=torch.bool)
    cont[list(continuation)] = True
    skip[list(skipped)] = True
    return cont, skip


def test_official_mlm_mask_counts_the_padded_length_and_drops_specials():
    """transformers 4.6 DataCollatorForWholeWordMask on padded text: n = round(L * p) positions of all L (banker's
    rounding), then special tokens and padding are unselected."""
    pad, cls, sep, mask_id, vocab = 0, 1, 2, 3, 40
    special = torch.tensor([pad, cls, sep, mask_id])
    cont, skip = _official_tables(vocab)   # RoBERTa-like: no continuations, nothing skipped by string
    g = torch.Generator().manual_seed(0)
    # a row of 30 real tokens between <s> and </s>: 32 positions, round(32 * 0.15) = round(4.8) = 5 candidates
    # of which <s>/</s> may be taken and then dropped: 3..5 real tokens selected
    full = torch.cat([torch.tensor([cls]), torch.arange(10, 40), torch.tensor([sep])]).repeat(400, 1)
    _, labels = official_mlm_mask(full, torch.ones_like(full), cont, skip, special, mask_id, vocab, 0.15, g)
    counts = (labels != -100).sum(1)
    assert counts.max() == 5 and counts.min() >= 3
    # P(both <s> and </s> missed) = C(30,5)/C(32,5): the mean count is 5 * 30/32 exactly in expectation
    assert counts.float().mean().item() == pytest.approx(5 * 30 / 32, abs=0.05)
    # padded to 50 with 8 real tokens: round(7.5) = 8 draws of 50 positions, real ones hypergeometric 8 * 8/50
    padded = torch.full((4000, 50), pad)
    padded[:, 0], padded[:, 1:9], padded[:, 9] = cls, torch.arange(10, 18), sep
    masked, labels = official_mlm_mask(padded, (padded != pad).long(), cont, skip, special, mask_id, vocab, 0.15, g)
    sel = labels != -100
    assert sel[:, 9:].sum() == 0 and sel[:, 0].sum() == 0   # never specials or padding
    assert sel.sum(1).float().mean().item() == pytest.approx(8 * 8 / 50, rel=0.05)
    assert torch.equal(labels[sel], padded[sel])
    # 80% mask token, 10% random id of the whole vocabulary (specials possible), 10% kept
    n = sel.sum().item()
    frac_mask = (masked[sel] == mask_id).sum().item() / n
    frac_kept = (masked[sel] == padded[sel]).sum().item() / n
    assert frac_mask == pytest.approx(0.8, abs=0.03) and frac_kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.03)
    assert torch.equal(masked[~sel], padded[~sel])


def test_official_mlm_mask_takes_whole_words_and_skips_cls_sep_strings():
    pad, cls, sep, mask_id, vocab = 0, 1, 2, 3, 40
    special = torch.tensor([pad, cls, sep, mask_id])
    # ids 20..29 are "##" pieces; [CLS]/[SEP] strings are not candidates at all
    cont, skip = _official_tables(vocab, continuation=range(20, 30), skipped=(cls, sep))
    # words: [10 20 21] [11] [12 22] [13] [14 23 24 25], 12 real tokens; L = 20, n = round(20 * 0.3) = 6
    row = torch.tensor([cls, 10, 20, 21, 11, 12, 22, 13, 14, 23, 24, 25, sep] + [pad] * 7)
    words = [[1, 2, 3], [4], [5, 6], [7], [8, 9, 10, 11]]
    g = torch.Generator().manual_seed(1)
    ids = row.repeat(300, 1)
    _, labels = official_mlm_mask(ids, (ids != pad).long(), cont, skip, special, mask_id, vocab, 0.3, g)
    sel = labels != -100
    for r in range(ids.shape[0]):
        for w in words:
            assert sel[r, w].all() or not sel[r, w].any()   # a word is masked whole or not at all
    # greedy over shuffled words up to n = 6, skipping overshoots; the 7 [PAD] words count (they are candidates)
    # but are unselected afterwards, so 0..6 real tokens; never more
    counts = sel.sum(1)
    assert counts.max() == 6 and not sel[:, 0].any() and not sel[:, 12:].any()


def test_official_masker_through_the_tokenizer(tokenizer):
    """build_masker(masking: official) reads "##" continuations from the real WordPiece vocabulary."""
    masker = build_masker(MlmConfig(mask_prob=0.15, masking="official"), tokenizer)
    enc = tokenizer(["an unbelievably photorealistic rendering"] * 200, padding="max_length", max_length=24,
                    return_tensors="pt")
    ids = enc["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    pieces = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert pieces, tokens   # the caption has multi-piece words
    _, labels = masker(ids, enc["attention_mask"], generator=torch.Generator().manual_seed(0))
    sel = labels != -100
    for i in pieces:   # a piece is selected exactly when its word's first piece is
        start = max(j for j in range(i) if not tokens[j].startswith("##"))
        assert torch.equal(sel[:, i], sel[:, start])
    assert sel.sum(1).max() <= round(24 * 0.15)


def test_heads_are_bert_initialised_like_the_released_code(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(), {"itm": ItmConfig(), "mlm": MlmConfig()}, tokenizer)
    for w, b in ((model.itm_head.weight, model.itm_head.bias),
                 (model.objectives["mlm"].head.decoder.weight, model.objectives["mlm"].head.decoder.bias),
                 (model.objectives["mlm"].head.transform[0].weight, model.objectives["mlm"].head.transform[0].bias)):
        assert w.std().item() == pytest.approx(0.02, rel=0.15) and (b == 0).all()


def test_mltc_mask_token_randn_is_standard_normal(tokenizer):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config(), vision=VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                                 embed_dim=768, depth=1, num_heads=12))
    std = {}
    for init in ("randn", "small"):
        model = build_model(cfg, {"mltc": MltcConfig(mask_token_init=init)}, tokenizer)
        std[init] = model.objectives["mltc"].mask_token.std().item()
    assert std["randn"] == pytest.approx(1.0, rel=0.1) and std["small"] == pytest.approx(0.02, rel=0.15)
