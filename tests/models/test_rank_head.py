"""models/tasks/retrieval.py: the SCL rank head ("rank" objective) against scores computed here pair by pair."""
import itertools

import pytest
import torch

from conftest import tiny_config
from models.backbone import ImageTokens
from models.objectives.itc import ItcConfig
from models.objectives.itm import ItmConfig
from models.tasks.retrieval import RankConfig, rank_keys_from_itm, rank_pair_score
from models.vlp import build_model

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles", "a yellow star above a line"]


def build(tokenizer, seed=0, itm=False, **rank):
    torch.manual_seed(seed)
    objectives = {"itc": ItcConfig(), **({"itm": ItmConfig()} if itm else {}), "rank": RankConfig(**rank)}
    return build_model(tiny_config(), objectives, tokenizer)


def make_batch(tokenizer, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {"pixel_values": torch.randn(len(captions), 1, 3, 32, 32, generator=g),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def pair_scores(model, batch):
    """(B, B): S[i, j] = rank_output(fuse(text j, image i)), one fusion call per pair."""
    head = model.objectives["rank"].rank_output
    b = batch["input_ids"].shape[0]
    s = torch.empty(b, b)
    for i in range(b):
        img = model.encode_image(batch["pixel_values"][i:i + 1])
        for j in range(b):
            ids, mask = batch["input_ids"][j:j + 1], batch["attention_mask"][j:j + 1]
            out = model.fuse(model.encode_text(ids, mask), mask, img, text_out="cls", image_out="cls")
            s[i, j] = head(out.cls_feats)[0, 0]
    return s


def ce_rows(s, allowed):
    """Mean over rows of -log softmax at the diagonal over the allowed columns (the diagonal always allowed)."""
    rows = [torch.logsumexp(s[i][allowed[i]], 0) - s[i, i] for i in range(s.shape[0])]
    return torch.stack(rows).mean()


def test_rank_output_starts_as_the_itm_positive_row_and_freezes_it(tokenizer):
    model = build(tokenizer)
    head, itm = model.objectives["rank"].rank_output, model.itm_head
    assert torch.equal(head.weight, itm.weight[1:2]) and torch.equal(head.bias, itm.bias[1:2])
    assert not torch.equal(itm.weight[0], itm.weight[1])   # the row matters
    assert head.weight.data_ptr() != itm.weight.data_ptr()   # a copy, not a view
    assert not any(p.requires_grad for p in itm.parameters()) and head.weight.requires_grad
    assert all(p.requires_grad for p in build(tokenizer, freeze_itm=False).itm_head.parameters())


def test_loss_is_cross_entropy_over_all_other_texts(tokenizer):
    """num_negatives = B - 1 with distinct captions: every other text is a negative, whatever the draw."""
    model = build(tokenizer, num_negatives=3).eval()
    batch = make_batch(tokenizer, CAPTIONS)
    s = pair_scores(model, batch)
    want = ce_rows(s, torch.ones(4, 4, dtype=torch.bool))
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.testing.assert_close(model(batch)["losses"]["rank"], want, rtol=1e-5, atol=1e-6)
    # more requested than the batch has: the same (B - 1 negatives)
    big = build(tokenizer, num_negatives=15).eval()
    torch.testing.assert_close(big(batch)["losses"]["rank"], want, rtol=1e-5, atol=1e-6)
    # the evaluator's pair score is the same head
    with torch.no_grad():
        img = model.encode_image(batch["pixel_values"][1:2]).tokens.expand(4, -1, -1)
        got = rank_pair_score(model, model.encode_text(batch["input_ids"], batch["attention_mask"]),
                              batch["attention_mask"], ImageTokens(img, 1))
    torch.testing.assert_close(got, s[1], rtol=1e-5, atol=1e-6)


def test_duplicate_captions_are_never_negatives(tokenizer):
    captions = [CAPTIONS[0], CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]]   # samples 0 and 1 share a caption
    model = build(tokenizer, num_negatives=3).eval()
    batch = make_batch(tokenizer, captions)
    s = pair_scores(model, batch)
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[0, 1] = allowed[1, 0] = False
    torch.manual_seed(0)
    torch.testing.assert_close(model(batch)["losses"]["rank"], ce_rows(s, allowed), rtol=1e-5, atol=1e-6)


def test_captions_of_the_same_image_are_never_negatives(tokenizer):
    """batch["image_ids"] (fine-tuning): samples 0 and 2 show the same image with different captions."""
    model = build(tokenizer, num_negatives=3).eval()
    batch = make_batch(tokenizer, CAPTIONS)
    s = pair_scores(model, batch)
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[0, 2] = allowed[2, 0] = False
    torch.manual_seed(0)
    got = model({**batch, "image_ids": torch.tensor([7, 3, 7, 5])})["losses"]["rank"]
    torch.testing.assert_close(got, ce_rows(s, allowed), rtol=1e-5, atol=1e-6)


def test_fewer_negatives_are_a_subset_drawn_without_replacement(tokenizer):
    """num_negatives = 2 of 3 others: for a fixed seed the loss is the CE of one choice of 2 distinct negatives per
    row; every such choice is enumerated here (3 per row, 81 in all)."""
    model = build(tokenizer, num_negatives=2).eval()
    batch = make_batch(tokenizer, CAPTIONS)
    s = pair_scores(model, batch)
    per_row = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        per_row.append([torch.logsumexp(s[i, [i, *pair]], 0) - s[i, i] for pair in itertools.combinations(others, 2)])
    candidates = torch.tensor([sum(c) / 4 for c in itertools.product(*per_row)])
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        loss = model(batch)["losses"]["rank"].item()
        gap = (candidates - loss).abs()
        assert gap.min() < 1e-5, seed
        seen.add(int(gap.argmin()))
    assert len(seen) > 1   # the draw is random


def test_frozen_itm_head_gets_no_gradient(tokenizer):
    batch = make_batch(tokenizer, CAPTIONS)
    for freeze in (True, False):
        model = build(tokenizer, itm=True, freeze_itm=freeze)   # ITM's loss reads the head too
        torch.manual_seed(0)
        model(batch)["loss"].backward()
        head = model.objectives["rank"].rank_output
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        itm = model.itm_head.weight.grad
        if freeze:
            assert itm is None and model.itm_head.bias.grad is None
        else:
            assert itm is not None and itm.abs().sum() > 0


def test_rank_keys_from_itm_fill_a_checkpoint_without_the_head(tokenizer):
    model = build(tokenizer)
    sd = {k: v.clone() for k, v in build(tokenizer, seed=1).state_dict().items() if ".rank_output." not in k}
    added = rank_keys_from_itm(sd)
    assert sorted(added) == ["objectives.rank.rank_output.bias", "objectives.rank.rank_output.weight"]
    model.load_state_dict(sd, strict=True)
    head = model.objectives["rank"].rank_output
    assert torch.equal(head.weight, sd["itm_head.weight"][1:2]) and torch.equal(head.bias, sd["itm_head.bias"][1:2])
    assert rank_keys_from_itm(sd) == []   # present keys are kept


def test_config_validation():
    for bad in (dict(num_negatives=0), dict(num_negatives=True), dict(weight=-1.0), dict(freeze_itm="yes")):
        with pytest.raises(ValueError, match=r"objectives\.rank\."):
            RankConfig(**bad).validate()


def test_micro_batch_of_one_has_zero_loss(tokenizer):
    model = build(tokenizer).eval()
    out = model(make_batch(tokenizer, CAPTIONS[:1]))
    assert out["losses"]["rank"].item() == 0.0
