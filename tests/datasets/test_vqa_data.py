"""VQAv2 data (datasets/vqa.py): the official answer normalisation on hand-checked cases, the reader on tiny files
with junk entries counted by reason, the answer vocabulary, and ViLT's soft targets. Every expected value is written
out by hand here, from the official script's rules, not computed with the module."""
import json
import os

import pytest

from datasets.vqa import (VqaItem, build_answer_vocab, build_answer_vocab_vilt, load_answer_vocab, normalize_answer,
                          read_vqa, save_answer_vocab, soft_targets)

# (raw answer, what the official vqaEval.py processing makes of it), each worked out by hand from its rules
NORMALIZED = [
    ("Two", "2"),                     # lower-case, number word -> digit
    ("ten", "10"),
    ("None", "0"),                    # "none" is in the official number table
    ("the dog.", "dog"),              # article dropped, a period not before a digit deleted
    ("A Dog\n", "dog"),               # newline -> space, strip, article
    ("  Yes \t", "yes"),
    ("yes!", "yes"),                  # "!" not next to a space: becomes a space, then split away
    ("dont", "don't"),                # contraction table
    ("whats up?", "what's up"),
    ("Im", "im"),                     # the table's key "Im" never matches after lower-casing (official quirk)
    ("it's", "it's"),                 # the apostrophe is not punctuation, "it's" is not a table key
    ("its", "its"),
    ("a", ""),                        # only an article: nothing left
    ("an apple", "apple"),
    ("1,000", "1000"),                # a comma between digits: every mark is deleted, not spaced
    ("1,000 (approx)", "1000 approx"),
    ("red-white", "red white"),       # "-" not next to a space: replaced by a space
    ("red -white", "red white"),      # " -" occurs: every "-" deleted -> "red white"
    ("black-and-white, blue", "black and white blue"),   # ", " deletes the comma; "-" still spaced
    ("x;-y z-w", "x y z w"),          # adjacency is judged on the input: ";" -> " " makes " -" only later
    ("cat/dog", "cat dog"),
    ("3.5", "3.5"),                   # a period before a digit stays
    ("5.", "5"),
    (".5", ".5"),
    ("3:00", "3:00"),                 # ":" is not in the official list
    ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE passed as `count`: only the first 32 periods go
    ("Yes, it is.", "yes it is"),
]


@pytest.mark.parametrize("raw,expected", NORMALIZED)
def test_normalize_answer_matches_the_official_processing(raw, expected):
    assert normalize_answer(raw) == expected


# --------------------------------------------------------------------------------------------------- the reader
def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1} for k, w in enumerate(words)]


def _files(tmp_path, questions, annotations, subtype="val2014"):
    q = _write(tmp_path / "q.json", {"questions": questions, "data_subtype": subtype, "task_type": "Open-Ended"})
    a = _write(tmp_path / "a.json", {"annotations": annotations, "data_subtype": subtype})
    return q, a


def _ann(qid, iid, answers, mc="yes", at="yes/no"):
    return {"question_id": qid, "image_id": iid, "answers": answers, "multiple_choice_answer": mc,
            "answer_type": at, "question_type": "is the"}


def test_reader_keeps_good_entries_and_counts_junk_by_reason(tmp_path):
    ten = ["yes"] * 7 + ["no"] * 3
    questions = [
        {"image_id": 42, "question": "Is it red?", "question_id": 420},          # good
        {"image_id": 7, "question": "How many?", "question_id": 70},             # good, 3-field answers
        "not a dict",                                                            # bad_entry
        {"image_id": 1, "question_id": 10},                                      # missing_field (question)
        {"image_id": "1", "question": "Why?", "question_id": 11},                 # bad_id
        {"image_id": 1, "question": "Why?", "question_id": True},                 # bad_id (bool is no id)
        {"image_id": 1, "question": 5, "question_id": 12},                        # bad_question
        {"image_id": 1, "question": "   ", "question_id": 13},                    # empty_question
        {"image_id": 42, "question": "Again?", "question_id": 420},               # duplicate_question_id
        {"image_id": 2, "question": "No annotation?", "question_id": 20},         # no_annotation
        {"image_id": 3, "question": "Bad answers?", "question_id": 30},           # bad_answers (not a list)
        {"image_id": 3, "question": "Bad answers 2?", "question_id": 31},         # bad_answers (answer not str)
        {"image_id": 3, "question": "Bad answers 3?", "question_id": 32},         # bad_answers (entry not dict)
        {"image_id": 3, "question": "No answers?", "question_id": 33},            # no_answers
        {"image_id": 4, "question": "Which image?", "question_id": 40},           # image_id_mismatch
    ]
    annotations = [
        _ann(420, 42, _answers(*ten)),
        _ann(70, 7, _answers("2", "two", "3"), mc="2", at="number"),
        _ann(30, 3, "yes"),
        _ann(31, 3, [{"answer": 1}]),
        _ann(32, 3, ["yes"]),
        _ann(33, 3, []),
        _ann(40, 5, _answers("no")),
        _ann(999, 9, _answers("yes")),          # unknown_question_id
        "junk",                                 # bad_annotation
        {"image_id": 1, "answers": []},         # bad_annotation (no question_id)
    ]
    q, a = _files(tmp_path, questions, annotations)
    items, skipped = read_vqa(q, a, image_root="/img")
    assert items == [
        VqaItem(420, "/img/COCO_val2014_000000000042.jpg", "Is it red?", ten, 42, "yes", "yes/no"),
        VqaItem(70, "/img/COCO_val2014_000000000007.jpg", "How many?", ["2", "two", "3"], 7, "2", "number"),
    ]
    assert skipped == {"bad_entry": 1, "missing_field": 1, "bad_id": 2, "bad_question": 1, "empty_question": 1,
                       "duplicate_question_id": 1, "no_annotation": 1, "bad_answers": 3, "no_answers": 1,
                       "image_id_mismatch": 1, "unknown_question_id": 1, "bad_annotation": 2}


def test_reader_without_annotations_and_with_a_vg_pattern(tmp_path):
    q = _write(tmp_path / "q.json", {"questions": [{"image_id": 2407890, "question": "What?", "question_id": 5}],
                                     "data_subtype": "test2015"})
    items, skipped = read_vqa(q, image_root="imgs")
    assert items == [VqaItem(5, "imgs/COCO_test2015_000002407890.jpg", "What?", [], 2407890)]
    assert skipped == {}
    # a converted VG-QA file has no data_subtype; its pattern does not name it
    q2 = _write(tmp_path / "vg.json", {"questions": [{"image_id": 12, "question": "Who?", "question_id": 6}]})
    items, _ = read_vqa(q2, image_root="vg", image_pattern="{image_id}.jpg")
    assert items[0].image == "vg/12.jpg"


@pytest.mark.parametrize("content,problem", [
    ("[1, 2]", "not a VQA questions file"),
    ('{"annotations": []}', "not a VQA questions file"),
    ('{"questions": {"a": 1}}', "not a VQA questions file"),
    ("{not json", "not a JSON file"),
    ('{"questions": []}', "data_subtype"),
])
def test_a_file_that_is_not_the_layout_is_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "questions.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_vqa(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


def test_a_bad_annotations_file_is_named(tmp_path):
    q = _write(tmp_path / "q.json", {"questions": [], "data_subtype": "val2014"})
    a = _write(tmp_path / "a.json", {"questions": []})     # the questions file passed as annotations
    with pytest.raises(ValueError, match=rf"^{str(tmp_path / 'a.json')}: not a VQA annotations file"):
        read_vqa(q, a)
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        read_vqa(q, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown field"):
        read_vqa(q, image_pattern="{image}.jpg")


# --------------------------------------------------------------------------------------------- answer vocabulary
def _item(qid, answers, mc=None):
    return VqaItem(qid, f"{qid}.jpg", "q?", list(answers), qid, mc)


def test_vocab_counts_every_normalized_human_answer_with_ties_by_string():
    # first occurrences deliberately out of alphabetical order among equal counts (b before 2, red before 3)
    items = [_item(1, ["no"] * 2 + ["yes"] * 6 + ["Yes!"] * 2),     # no 2, yes 8
             _item(2, ["b", "b", "b", "red", "the cat", "cat", "two", "2", "Two", "a"]),   # b 3, red 1, cat 2, 2: 3
             _item(3, ["no", "no", "blue", "3"])]                    # no 4 total, blue 1, 3 1
    # by hand: yes 8, no 4, 2 3, b 3, cat 2, 3 1, blue 1, red 1 ("a" normalises to "" and is left out)
    assert build_answer_vocab(items, size=100) == ["yes", "no", "2", "b", "cat", "3", "blue", "red"]
    assert build_answer_vocab(items, size=4) == ["yes", "no", "2", "b"]
    assert build_answer_vocab(items, size=7) == ["yes", "no", "2", "b", "cat", "3", "blue"]
    with pytest.raises(ValueError):
        build_answer_vocab(items, size=0)


def test_vilt_vocab_is_multiple_choice_answers_over_a_threshold_in_first_seen_order():
    mcs = ["yes", "no", "no", "Two", "no", "yes", "2", "2", "red"]    # "Two" and "2" are one answer
    items = [_item(i, ["x"] * 10, mc) for i, mc in enumerate(mcs)]
    # by hand: yes 2 (first at 0), no 3 (first at 1), 2 3 (first at 3), red 1: first-seen order, not by count
    assert build_answer_vocab_vilt(items, min_count=2) == ["yes", "no", "2"]
    assert build_answer_vocab_vilt(items, min_count=3) == ["no", "2"]


def test_vocab_file_round_trip_and_bad_files(tmp_path):
    path = str(tmp_path / "answers.json")
    save_answer_vocab(path, ["yes", "no", "2"])
    assert json.loads(open(path).read()) == ["yes", "no", "2"]
    assert load_answer_vocab(path) == ["yes", "no", "2"]
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
    for content in ('{"yes": 0}', "[]", '["yes", 3]', '["yes", "yes"]', "nope"):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'bad.json'}: ") as e:
            load_answer_vocab(str(tmp_path / "bad.json"))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        save_answer_vocab(path, ["a", "a"])


# -------------------------------------------------------------------------------------------------- soft targets
def test_soft_targets_score_the_number_of_humans():
    vocab_index = {"yes": 0, "no": 1, "2": 2, "red": 3, "blue": 4}
    answers = ["yes"] * 4 + ["no"] * 3 + ["Two", "2"] + ["maybe"]
    # by hand: yes 4 humans -> 1.0, no 3 -> 0.9, "Two" and "2" -> 2 humans -> 0.6, maybe not in the vocabulary
    assert soft_targets(answers, vocab_index) == pytest.approx({0: 1.0, 1: 0.9, 2: 0.6})
    # as written (ViLT): "Two" is not "2"
    assert soft_targets(answers, vocab_index, normalize=False) == pytest.approx({0: 1.0, 1: 0.9, 2: 0.3})
    assert soft_targets(["red"] * 10, vocab_index) == pytest.approx({3: 1.0})
    assert soft_targets(["blue", "red", "red"], vocab_index) == pytest.approx({4: 0.3, 3: 0.6})
    assert soft_targets([], vocab_index) == {}
