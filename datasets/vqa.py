"""VQAv2 data: the official answer normalisation, the annotation reader, the answer vocabulary and soft targets.

Answer processing follows the official evaluation (GT-Vision-Lab/VQA master, PythonEvaluationTools/vqaEvaluation/
vqaEval.py): newlines / tabs become spaces and the text is stripped, then `process_punctuation` and
`process_digit_article`; `normalize_answer` is that whole chain (when the official script applies it is in
train/vqa_eval.py). Quirks of the official code kept on purpose, since they decide which answers count as equal:
  * punctuation: for each mark, if the *input* has it next to a space anywhere ("p " or " p"), or has a comma
    between two digits anywhere ("1,000"), every occurrence of the mark is deleted; otherwise every occurrence
    becomes a space. So "1,000" -> "1000", "yes!" -> "yes", "red-white" -> "red white", "red - white" -> "red white".
    The apostrophe, colon and period are not in the list.
  * periods: a "." not followed by a digit is deleted ("dog." -> "dog", "3.5" kept). The official pattern starts
    with "(?!<=\\d)", a look-*ahead* for the text "<=" + digit (a typo for a look-behind) that never fails in front
    of a ".", so it is left out here; the official call passes re.UNICODE (= 32) as `count`, so only the first 32
    such periods are deleted; that is kept.
  * words: lower-cased, split on whitespace, number words zero..ten (and "none") become digits, the articles a /
    an / the are dropped, then contractions without apostrophe get it ("dont" -> "don't"); the table's capitalised
    keys ("Im", "Ive", ...) never match after lower-casing, as in the official code.

The reader reads the official layout (questions file + optional annotations file); VG-QA converted to that layout
reads the same way with its own `image_pattern`. Nothing here knows a model.
"""
from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

# ------------------------------------------------------------------------------------- official answer processing
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")   # in the official order (the order matters: each mark is handled on the previous result)
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32   # the official call's re.UNICODE, passed where re.sub takes `count`


def process_punctuation(text: str) -> str:
    """The official processPunctuation (see the module docstring). Ground-truth answers get only this."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case words, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(ans: str) -> str:
    """The official evaluation's full answer processing (whitespace, punctuation, digits / articles / contractions)."""
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(ans))


# ---------------------------------------------------------------------------------------------------- the reader
IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"
SKIP_REASONS = ("bad_entry", "missing_field", "bad_id", "bad_question", "empty_question", "duplicate_question_id",
                "no_annotation", "bad_annotation", "bad_answers", "no_answers", "image_id_mismatch",
                "unknown_question_id")   # the last one counts annotations whose question is not in the file


@dataclass
class VqaItem:
    question_id: int
    image: str                     # path of the image file
    question: str
    answers: list[str] = field(default_factory=list)   # the raw human answers (10 in VQAv2); [] without annotations
    image_id: int = -1
    multiple_choice_answer: Optional[str] = None        # the annotation's most common answer (ViLT's vocabulary)
    answer_type: Optional[str] = None                   # "yes/no", "number", "other"


def _load_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except OSError as e:
        raise ValueError(f"{path}: cannot read the VQA {what} file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({' '.join(str(e).split())})") from None
    return obj


def _list_field(obj, key: str, path: str, what: str) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        got = f"a JSON {type(obj).__name__}" if not isinstance(obj, dict) else f"keys {sorted(obj)[:8]}"
        raise ValueError(f"{path}: not a VQA {what} file (expected an object with a {key!r} list, got {got})")
    return obj[key]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pattern_fields(pattern: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise ValueError(f"image_pattern {pattern!r}: {e}") from None


def read_vqa(questions_path: str, annotations_path: Optional[str] = None, image_root: str = "",
             image_pattern: str = IMAGE_PATTERN) -> tuple[list[VqaItem], dict[str, int]]:
    """Items in the questions file's order and the skipped entries counted by reason (SKIP_REASONS).

    image path = os.path.join(image_root, image_pattern.format(data_subtype=..., image_id=...)), data_subtype from
    the questions file (needed only when the pattern names it). With an annotations file every kept question has
    one annotation with a non-empty list of answers; a question without one is skipped ("no_annotation"). A file
    that is not the layout at all raises ValueError("<path>: ...")."""
    fields = _pattern_fields(image_pattern)
    unknown = fields - {"data_subtype", "image_id"}
    if unknown:
        raise ValueError(f"image_pattern {image_pattern!r}: unknown field(s) {sorted(unknown)}; "
                         "known: data_subtype, image_id")
    qobj = _load_json(questions_path, "questions")
    questions = _list_field(qobj, "questions", questions_path, "questions")
    subtype = qobj.get("data_subtype")
    if "data_subtype" in fields and not isinstance(subtype, str):
        raise ValueError(f"{questions_path}: no 'data_subtype' string (the image pattern {image_pattern!r} "
                         "needs it)")
    skipped: Counter = Counter()

    answers_by_qid: Optional[dict[int, dict]] = None
    if annotations_path is not None:
        anns = _list_field(_load_json(annotations_path, "annotations"), "annotations", annotations_path,
                           "annotations")
        answers_by_qid = {}
        for a in anns:
            if not isinstance(a, dict):
                skipped["bad_annotation"] += 1
            elif not _is_int(a.get("question_id")) or ("image_id" in a and not _is_int(a["image_id"])):
                skipped["bad_annotation"] += 1
            elif a["question_id"] in answers_by_qid:
                skipped["bad_annotation"] += 1    # two annotations for one question: the first one is kept
            else:
                answers_by_qid[a["question_id"]] = a

    items: list[VqaItem] = []
    seen: set[int] = set()
    for q in questions:
        if not isinstance(q, dict):
            skipped["bad_entry"] += 1
            continue
        if any(k not in q for k in ("question_id", "image_id", "question")):
            skipped["missing_field"] += 1
            continue
        qid, iid, text = q["question_id"], q["image_id"], q["question"]
        if not (_is_int(qid) and _is_int(iid)):
            skipped["bad_id"] += 1
            continue
        if not isinstance(text, str):
            skipped["bad_question"] += 1
            continue
        if not text.strip():
            skipped["empty_question"] += 1
            continue
        if qid in seen:
            skipped["duplicate_question_id"] += 1
            continue
        seen.add(qid)
        item = VqaItem(question_id=qid, image=os.path.join(image_root, image_pattern.format(
            data_subtype=subtype, image_id=iid)), question=text.strip(), image_id=iid)
        if answers_by_qid is not None:
            ann = answers_by_qid.get(qid)
            if ann is None:
                skipped["no_annotation"] += 1
                continue
            if "image_id" in ann and ann["image_id"] != iid:
                skipped["image_id_mismatch"] += 1
                continue
            answers = ann.get("answers")
            if not isinstance(answers, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
                skipped["bad_answers"] += 1
                continue
            if not answers:
                skipped["no_answers"] += 1
                continue
            item.answers = [x["answer"] for x in answers]
            mc = ann.get("multiple_choice_answer")
            item.multiple_choice_answer = mc if isinstance(mc, str) else None
            at = ann.get("answer_type")
            item.answer_type = at if isinstance(at, str) else None
        items.append(item)
    if answers_by_qid is not None:
        listed = {q.get("question_id") for q in questions if isinstance(q, dict)}
        extra = sum(1 for qid in answers_by_qid if qid not in listed)
        if extra:
            skipped["unknown_question_id"] += extra
    return items, dict(skipped)


# ---------------------------------------------------------------------------------------------- answer vocabulary
def build_answer_vocab(items: Iterable[VqaItem], size: int = 3129) -> list[str]:
    """The `size` most frequent answers, counting every human answer of every item after `normalize_answer`;
    equal counts are ordered by the answer string. Empty answers (all punctuation / articles) are left out."""
    if not (_is_int(size) and size >= 1):
        raise ValueError(f"answer vocabulary size must be an int >= 1, got {size!r}")
    counts = Counter(a for it in items for a in map(normalize_answer, it.answers) if a)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def build_answer_vocab_vilt(items: Iterable[VqaItem], min_count: int = 9) -> list[str]:
    """ViLT's / METER's vocabulary (their write_vqa.py, run on train + val items): each question's
    `multiple_choice_answer` normalised by their normalize_word (the official punctuation and digit / article
    steps, without the newline / tab / strip step), kept if it occurs >= min_count times, in the order of first
    occurrence. 9 on VQAv2 train2014 + val2014 gives their 3129 answers, in their label order."""
    counts: Counter = Counter()
    for it in items:
        if it.multiple_choice_answer is not None:
            counts[process_digit_article(process_punctuation(it.multiple_choice_answer))] += 1
    return [a for a, c in counts.items() if c >= min_count]   # Counter keeps insertion order


def save_answer_vocab(path: str, vocab: list[str]) -> None:
    _check_vocab(vocab, path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(list(vocab), f, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def load_answer_vocab(path: str) -> list[str]:
    vocab = _load_json(path, "answer vocabulary")
    _check_vocab(vocab, path)
    return vocab


def _check_vocab(vocab, path: str) -> None:
    if not isinstance(vocab, list) or not vocab or not all(isinstance(a, str) for a in vocab):
        raise ValueError(f"{path}: an answer vocabulary is a non-empty JSON list of strings")
    dup = next((a for a, c in Counter(vocab).items() if c > 1), None)
    if dup is not None:
        raise ValueError(f"{path}: answer {dup!r} occurs more than once in the vocabulary")


# ---------------------------------------------------------------------------------------------------- soft targets
def answer_score(count: int) -> float:
    """ViLT's (and BAN's) soft score from the number of humans who gave an answer."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def soft_targets(answers: list[str], vocab_index: dict[str, int], normalize: bool = True) -> dict[int, float]:
    """{vocab index: score} for the answers in the vocabulary (others are ignored). Answers are counted after
    `normalize_answer` (normalize=False: counted as written, which is what ViLT's write_vqa.py does)."""
    counts = Counter(normalize_answer(a) if normalize else a for a in answers)
    return {vocab_index[a]: answer_score(c) for a, c in counts.items() if a in vocab_index}
