"""ALIGN-BENCH reader (datasets/align_bench.py): bad items are skipped by reason, never a crash; pickles naming code are
refused without running it; sub-word merging for WordPiece and byte-level BPE; truncated phrases are skipped."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.align_bench import (AlignBenchReader, BadItem, PHRASE_TRUNCATED, RefusedPickle, find_phrase,
                                  merge_words, safe_load_pickle, word_marker)

CAPTION = "A dog sits on a bookshelf near the red sofa."


def write_item(root, key, caption=CAPTION, annotation=None, size=(40, 60), image=True, pkl=True):
    h, w = size
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "pkls"), exist_ok=True)
    if image:
        rng = np.random.default_rng(abs(hash(key)) % 2 ** 32)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "images", f"{key}.jpg"))
    if annotation is None:
        pm = np.zeros((h, w), bool)
        pm[5:20, 10:30] = True
        annotation = {"dog": [{"bbox_mask": [10, 5, 30, 20], "pixel_mask": pm}]}
    if pkl:
        with open(os.path.join(root, "pkls", f"{key}.pkl"), "wb") as f:
            pickle.dump({"caption": caption, "annotation": annotation}, f)


def reader(root, tok, max_text_len=32):
    return AlignBenchReader(str(root), tok, image_size=64, grid=(4, 4), max_text_len=max_text_len)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_items_are_skipped_by_reason(tmp_path, tok):
    root = tmp_path / "bench"
    pm = np.zeros((40, 60), bool)
    pm[2:9, 3:8] = True
    write_item(root, "0")                                     # good
    write_item(root, "1", pkl=False)                          # missing_pkl
    write_item(root, "2", image=False)                        # missing_image
    write_item(root, "3")
    (root / "pkls" / "3.pkl").write_bytes(b"\x80\x04junk that is not a pickle")          # unreadable_pkl
    marker = tmp_path / "PWNED"
    write_item(root, "4")
    (root / "pkls" / "4.pkl").write_bytes(pickle.dumps({"caption": CAPTION, "annotation": {"dog": [
        {"bbox_mask": [0, 0, 5, 5], "pixel_mask": _RunsCode(marker)}]}}))                   # refused_pkl
    write_item(root, "5", annotation={"cat": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}]})  # phrase_not_in_caption
    write_item(root, "6", annotation={"dog": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": np.zeros((40, 60), bool)}]})
    write_item(root, "7", annotation={"dog": [{"bbox_mask": [70, 50, 90, 60], "pixel_mask": pm}]})   # outside
    write_item(root, "8", caption=12)                                                     # bad_format
    write_item(root, "9")
    (root / "images" / "9.jpg").write_bytes(b"not a jpeg")                                # unreadable_image
    write_item(root, "10", annotation={"dog": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": np.ones((4, 4), bool)}]})
    write_item(root, "11", annotation={"dog": [{"bbox_mask": "1 1 9 9", "pixel_mask": pm}]})       # bad_format
    # "bookshelf" is books ##hel ##f: the word is "bookshelf", so the phrase "books" is not in the caption
    write_item(root, "12", annotation={"books": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}]})
    r = reader(root, tok)
    assert r.keys() == [str(i) for i in range(13)]
    got = {}
    for k in r.keys():
        try:
            r.read(k)
            got[k] = "ok"
        except BadItem as e:
            got[k] = e.reason
    assert got == {"0": "ok", "1": "missing_pkl", "2": "missing_image", "3": "unreadable_pkl", "4": "refused_pkl",
                   "5": "phrase_not_in_caption", "6": "empty_mask", "7": "box_outside_image", "8": "bad_format",
                   "9": "unreadable_image", "10": "mask_shape", "11": "bad_format",
                   "12": "phrase_not_in_caption"}
    assert not marker.exists()   # the os.system call was never made


def test_safe_unpickler_allows_data_refuses_code(tmp_path):
    p = tmp_path / "x.pkl"
    data = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": torch.ones(2, 2, dtype=torch.bool),
            "c": np.int64(7), "d": [1.5, None, True, ("s",)]}
    p.write_bytes(pickle.dumps(data))
    out = safe_load_pickle(str(p))
    assert np.array_equal(out["a"], data["a"]) and torch.equal(out["b"], data["b"]) and out["c"] == 7
    assert out["d"] == data["d"]
    p.write_bytes(pickle.dumps(_RunsCode(tmp_path / "M")))
    with pytest.raises(RefusedPickle, match="posix.system|os.system"):
        safe_load_pickle(str(p))
    p.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")   # protocol 0: builtins.eval
    with pytest.raises(RefusedPickle, match="builtins.eval"):
        safe_load_pickle(str(p))


def test_good_item_tensors_and_masks(tmp_path, tok):
    """numpy ints as box coordinates, a torch tensor as pixel mask; pixels squashed to S x S uint8; the grid mask of a
    box covering the left half of the image is 1 on the left columns, 0 on the right ones."""
    root = tmp_path / "bench"
    pm = torch.zeros(40, 64, dtype=torch.bool)
    pm[:, :32] = True
    write_item(root, "0", size=(40, 64), annotation={"red sofa": [
        {"bbox_mask": np.array([0, 0, 32, 40], dtype=np.int64), "pixel_mask": pm}]})
    item = reader(root, tok).read("0")
    assert item.pixel_values.shape == (1, 3, 64, 64) and item.pixel_values.dtype == torch.uint8
    assert item.size == (40, 64)
    (p,) = item.phrases
    assert p.text == "red sofa" and torch.allclose(p.box, p.pixel)
    assert (p.box[:, 0] > 0.99).all() and (p.box[:, 3] < 0.01).all()
    ids = item.input_ids[p.tokens].tolist()
    assert tok.convert_ids_to_tokens(ids) == ["red", "sofa"]


def test_word_merging_wordpiece_and_bpe(tok):
    assert word_marker(tok) is None   # MiniLM: BERT WordPiece
    bert = ["a", "bed", "##room", ",", "book", "##shel", "##f", "."]
    assert merge_words(bert, None) == [[0], [1, 2], [4, 5, 6]]
    roberta = ["A", "Ġbed", "room", "Ġwith", ",", "Ġa", "Ġbook", "shelf", "."]
    assert merge_words(roberta, "Ġ") == [[0], [1, 2], [3], [5], [6, 7]]
    # under the other convention the same strings merge differently (the rule matters)
    assert merge_words(roberta, None) != merge_words(roberta, "Ġ")
    assert find_phrase(["a", "red", "sofa", "red"], ["red", "sofa"]) == 1
    assert find_phrase(["a", "red"], ["red", "sofa"]) == -1


def test_phrase_beyond_truncation_is_skipped_and_counted(tmp_path, tok):
    root = tmp_path / "bench"
    pm = np.ones((40, 60), bool)
    cap = "a dog " + "and a very long story " * 4 + "ending with a lamp."
    write_item(root, "0", caption=cap, annotation={"dog": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}],
                                                   "lamp": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}]})
    item = reader(root, tok, max_text_len=12).read("0")
    assert [p.text for p in item.phrases] == ["dog"] and item.skipped_phrases == {PHRASE_TRUNCATED: 1}
    assert int(item.attention_mask.sum()) == 12
    item = reader(root, tok, max_text_len=64).read("0")
    assert [p.text for p in item.phrases] == ["dog", "lamp"] and not item.skipped_phrases


def test_byte_level_bpe_tokenizer_end_to_end(tmp_path):
    """A RoBERTa-style tokenizer (byte-level BPE, trained here on a few words so 'bookshelf' splits into pieces):
    'Ġ' starts words, the phrase's token positions are exactly its pieces, CLS <s> and </s> excluded."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a dog sits on a book near the red sofa"] * 20 + ["shelf"], vocab_size=300,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    tok = RobertaTokenizerFast.from_pretrained(str(tmp_path))
    assert word_marker(tok) == "Ġ"
    root = tmp_path / "bench"
    pm = np.ones((40, 60), bool)
    write_item(root, "0", caption="A dog sits on a bookshelf near the red sofa and a zebra.",
               annotation={"red sofa": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}],
                           "bookshelf": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}],
                           "zebra": [{"bbox_mask": [1, 1, 9, 9], "pixel_mask": pm}]})
    item = reader(root, tok, max_text_len=64).read("0")
    got = {p.text: tok.convert_ids_to_tokens(item.input_ids[p.tokens].tolist()) for p in item.phrases}
    assert got["red sofa"] == ["Ġred", "Ġsofa"]
    assert len(got["bookshelf"]) > 1 and got["bookshelf"][0].startswith("Ġ")
    assert tok.convert_tokens_to_string(got["bookshelf"]).strip() == "bookshelf"
    assert got["zebra"][0] == "Ġ" and "".join(got["zebra"][1:]) == "zebra"   # unseen word: a lone 'Ġ' then bytes
    assert item.input_ids[0] == tok.cls_token_id
