"""models.masking.bert_mask, the one MLM masking rule: the data workers (data.mlm_probability, wired by
train/pretrain.py) and the device (the MLM objective's call) give identical masks for one generator state, and the
rule's statistics hold against counts made here independently."""
import collections
from types import SimpleNamespace

import pytest
import torch

from models.masking import bert_mask

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = {PAD, UNK, CLS, SEP, MASK}
VOCAB = 1000


def _captions(rows=4096, length=40, seed=0):
    """[CLS] words [SEP] [PAD]... with word ids drawn from the whole vocabulary, specials included (an [UNK] or a
    stray [MASK] inside a caption must not be selected either)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(3, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def _special_tensor():
    return torch.tensor(sorted(SPECIAL))


def test_statistics_against_independent_counts():
    ids, mask = _captions()
    p = 0.15
    masked, labels = bert_mask(ids, mask, _special_tensor(), MASK, VOCAB, p, generator=torch.Generator().manual_seed(1))
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == ids.dtype
    candidates = selected = to_mask = kept = replaced = 0
    replacements = []
    for row_ids, row_mask, row_masked, row_labels in zip(ids.tolist(), mask.tolist(), masked.tolist(),
                                                         labels.tolist()):
        for i, m, out, lab in zip(row_ids, row_mask, row_masked, row_labels):
            can = m == 1 and i not in SPECIAL
            candidates += can
            if lab == -100:
                assert out == i  # not selected: unchanged
                continue
            assert can, (i, m)  # never a special token, never padding
            assert lab == i
            selected += 1
            if out == MASK:
                to_mask += 1
            elif out == i:
                kept += 1
            else:
                assert out not in SPECIAL and 0 <= out < VOCAB  # a random *word*
                replaced += 1
                replacements.append(out)
    assert candidates > 50_000
    assert abs(selected / candidates - p) < 0.005
    # of the selected: 80% [MASK], 10% random word, 10% unchanged (+ the random draws that hit their own id)
    assert abs(to_mask / selected - 0.8) < 0.01
    assert abs(replaced / selected - 0.1) < 0.01
    assert abs(kept / selected - 0.1) < 0.01
    # drawn uniformly over the whole non-special pool: n draws over N ids hit N (1 - (1 - 1/N)^n) distinct ids
    pool = VOCAB - len(SPECIAL)
    expected = pool * (1 - (1 - 1 / pool) ** len(replacements))
    assert abs(len(set(replacements)) - expected) < 0.05 * expected


def test_replacements_cover_exactly_the_non_special_pool_uniformly():
    vocab, special = 12, [11, 0, 4, 3]  # unsorted on purpose, at both ends and adjacent
    ids = torch.full((4000, 10), 5)
    masked, labels = bert_mask(ids, torch.ones_like(ids), torch.tensor(special), 3, vocab, 1.0,
                               generator=torch.Generator().manual_seed(2))
    assert (labels == 5).all()  # probability 1: every real non-special token is selected
    drawn = masked[(masked != 3) & (masked != 5)].tolist()
    counts = collections.Counter(drawn)
    pool = [i for i in range(vocab) if i not in special]
    assert set(counts) == set(pool) - {5}  # never a special id, every other pool id reachable
    # the 10% random draws fall on all 8 pool ids alike (5 shows up as "unchanged"); 4000 draws/8 = 500 each
    assert all(350 < counts[i] < 650 for i in set(pool) - {5}), counts


def test_nothing_is_forced_and_same_generator_same_masks():
    ids, mask = _captions(rows=2, length=8)
    _, labels = bert_mask(ids, mask, _special_tensor(), MASK, VOCAB, 1e-9, generator=torch.Generator().manual_seed(0))
    assert (labels == -100).all()  # an empty selection is allowed: the MLM objective returns a zero loss for it
    a = bert_mask(ids, mask, _special_tensor(), MASK, VOCAB, 0.5, generator=torch.Generator().manual_seed(3))
    b = bert_mask(ids, mask, _special_tensor(), MASK, VOCAB, 0.5, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("special, match", [([0, 0, 3], "unique"), ([0, 12], r"\[0, 12\)"), ([-1], "unique")])
def test_bad_special_ids_are_refused(special, match):
    ids = torch.full((1, 4), 5)
    with pytest.raises(ValueError, match=match):
        bert_mask(ids, torch.ones_like(ids), torch.tensor(special), 3, 12, 0.5)


def test_data_workers_and_device_give_identical_masks(demo_shards, tokenizer):
    """The data path through the real loader (the text masker train/pretrain.py builds, the loader's seeded
    generator, its collate) against the device path: bert_mask called with the MLM objective's own attributes."""
    from datasets.config import DataConfig, SourceConfig
    from datasets.loader import build_train_loader
    from train.pretrain import text_masker

    p = 0.3
    cfg = DataConfig(train=[SourceConfig(demo_shards["paths"]["train_images"])], image_size=32, num_workers=0,
                     shuffle_buffer=10, max_text_len=24, mlm_probability=p)
    masker = text_masker(SimpleNamespace(data=cfg, objectives={}), tokenizer)   # no mlm section: the default rule
    states = []

    def recording(input_ids, attention_mask, *, generator):
        states.append(generator.get_state())  # the generator as the loader hands it over, before any draw
        return masker(input_ids, attention_mask, generator=generator)

    loader = build_train_loader(cfg, tokenizer, micro_batch_size=8, rank=0, world_size=1, seed=0,
                                text_masker=recording)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    assert len(states) == 4 and len({bytes(s.numpy()) for s in states}) == 4  # a fresh seed per batch
    # the MLM objective's arguments: its special_ids buffer (sorted, unique), the tokenizer's mask id, the
    # tokenizer's size as the replacement pool's bound, its mask_prob (= data.mlm_probability, checked at start)
    special_ids = torch.tensor(sorted({int(i) for i in tokenizer.all_special_ids}))
    selected = 0
    for batch, state in zip(batches, states):
        g = torch.Generator()
        g.set_state(state)
        masked, labels = bert_mask(batch["input_ids"], batch["attention_mask"], special_ids, tokenizer.mask_token_id,
                                   len(tokenizer), p, generator=g)
        assert torch.equal(batch["mlm_input_ids"], masked) and torch.equal(batch["mlm_labels"], labels)
        selected += int((labels != -100).sum())
    assert selected > 0
