"""ALIGN-BENCH reader (GLSCL's alignment benchmark, methods.md §1.7): items, preprocessing, ground-truth masks.

Layout (the released benchmark's): DIR/images/N.jpg and DIR/pkls/N.pkl, each pickle a dict
    {"caption": str, "annotation": {phrase: [{"bbox_mask": [x1, y1, x2, y2], "pixel_mask": HxW bool}, ...]}}
with coordinates in original image pixels. Pickles are read by `safe_load_pickle`, which rebuilds only plain
containers, numpy arrays/scalars and torch tensors; a pickle naming anything else (os.system, ...) is refused and
nothing it names is imported or called.

`AlignBenchReader.read(key)` returns an `AlignItem` (pixels resized to S x S bicubic as the official scripts'
Resize((S, S)) + CenterCrop(S), uint8 like our loaders, normalised later by datasets.batch.to_device; the caption
tokenised as the eval loader does; every ground-truth mask already resized to the patch grid) or raises
`BadItem(reason)`. Reasons (`REASONS`) are counted by the caller; the benchmark never stops on a bad item.
This module knows no model: the scorer (train/align_bench.py) runs the model and reads the attention.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .text import clean_caption

# item-level reasons (the item is skipped) ...
REASONS = ("missing_pkl", "missing_image", "unreadable_pkl", "refused_pkl", "unreadable_image", "bad_format",
           "no_annotation", "phrase_not_in_caption", "empty_mask", "box_outside_image", "mask_shape")
# ... and the phrase-level one (that phrase is skipped, the item is scored without it)
PHRASE_TRUNCATED = "phrase_truncated"
BACKGROUND_FRACTION = 0.9   # a box covering more than this of the image is background (skipped in global)
PUNCTUATION = (".", ",")    # words skipped when captions are split into words (as released)


class BadItem(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class RefusedPickle(pickle.UnpicklingError):
    pass


# ----------------------------------------------------------------------------------------------- safe pickles
def _load_storage_bytes(b: bytes):
    """torch.storage._load_from_bytes, but with weights_only=True (torch's own calls torch.load unrestricted)."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _allowed_globals() -> dict:
    import collections
    import codecs

    from torch import _utils

    out = {("collections", "OrderedDict"): collections.OrderedDict,
           ("_codecs", "encode"): codecs.encode,   # protocol-2 pickles spell bytes as encode(str, 'latin1')
           ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
           ("torch.storage", "_load_from_bytes"): _load_storage_bytes, ("torch", "Size"): torch.Size}
    for t in (set, frozenset, int, float, bool, str, bytes, tuple, list, dict, complex):
        out[("builtins", t.__name__)] = t
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):   # numpy 1.x and 2.x spell them so
        out[(mod, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(1))[0]
        out[(mod, "scalar")] = np.zeros(1).sum().__reduce__()[0]
    for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        if hasattr(_utils, n):
            out[("torch._utils", n)] = getattr(_utils, n)
    return out


_ALLOWED = _allowed_globals()


class SafeUnpickler(pickle.Unpickler):
    """Plain containers, numpy arrays / scalars / dtypes and torch tensors; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        if module.startswith("numpy.dtypes") and name.endswith("DType"):   # numpy 2 pickles dtype classes by name
            import numpy.dtypes
            cls = getattr(numpy.dtypes, name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise RefusedPickle(f"the pickle names {module}.{name}, which an ALIGN-BENCH item has no reason to")


def safe_load_pickle(path: str):
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


# ----------------------------------------------------------------------------------------------- words
def word_marker(tokenizer) -> Optional[str]:
    """'Ġ' (byte-level BPE: RoBERTa, GPT-2) or '▁' (SentencePiece): a token beginning with it starts a word;
    None: WordPiece (BERT), where a token beginning with '##' continues the previous word."""
    toks = tokenizer.tokenize("a photo")
    for m in ("Ġ", "▁"):
        if len(toks) > 1 and toks[1].startswith(m):
            return m
    return None


def merge_words(tokens: list[str], marker: Optional[str]) -> list[list[int]]:
    """Token strings (no CLS/SEP) -> words as lists of token positions. The first token starts a word; then a token
    starts one when it begins with `marker` (BPE) or, for WordPiece (marker None), when it does not begin with
    '##'. Tokens '.' and ',' are dropped (as the released align_local.py does)."""
    words: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t in PUNCTUATION:
            continue
        if marker is not None:
            starts = not words or t.startswith(marker)
        else:
            starts = not words or not t.startswith("##")
        if starts:
            words.append([i])
        else:
            words[-1].append(i)
    return words


def word_strings(tokenizer, tokens: list[str], words: list[list[int]]) -> list[str]:
    return [tokenizer.convert_tokens_to_string([tokens[i] for i in w]).strip().lower() for w in words]


def find_phrase(words: list[str], phrase: list[str]) -> int:
    """Index of the first occurrence of the word sequence `phrase` in `words`, -1 if none."""
    n = len(phrase)
    for i in range(len(words) - n + 1):
        if words[i:i + n] == phrase:
            return i
    return -1


# ----------------------------------------------------------------------------------------------- masks
def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) {0, 1} mask at the image's size -> (gh, gw) float: bicubic (as released), clamped to [0, 1]."""
    m = mask.float()[None, None]
    return F.interpolate(m, size=grid, mode="bicubic", align_corners=False, antialias=True)[0, 0].clamp(0, 1)


@dataclass
class Region:
    box: tuple[int, int, int, int]   # x1, y1, x2, y2 in original pixels, clamped to the image
    pixel: np.ndarray                # (H, W) bool
    background: bool                 # the box covers > 90% of the image


@dataclass
class Phrase:
    text: str
    tokens: list[int]                # positions in input_ids of the phrase's words' tokens
    regions: list[Region]
    box: torch.Tensor                # (gh, gw) grid masks
    pixel: torch.Tensor


@dataclass
class AlignItem:
    key: str
    image_path: str
    caption: str
    size: tuple[int, int]            # original (height, width)
    pixel_values: torch.Tensor       # (1, 3, S, S) uint8
    input_ids: torch.Tensor          # (L,)
    attention_mask: torch.Tensor     # (L,)
    phrases: list[Phrase]            # those whose words lie inside the (truncated) text
    regions: list[Region]            # every annotated region
    global_box: Optional[torch.Tensor]     # (gh, gw) union of the non-background regions; None: all background
    global_pixel: Optional[torch.Tensor]
    skipped_phrases: dict = field(default_factory=dict)   # reason -> count


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and np.isfinite(float(v))


def _as_bool_mask(m) -> Optional[np.ndarray]:
    if torch.is_tensor(m):
        m = m.numpy()
    if not isinstance(m, np.ndarray) or m.ndim != 2 or m.dtype == object:
        return None
    if m.dtype.kind not in "biuf":
        return None
    return m != 0


def list_keys(root: str) -> list[str]:
    """Item keys: the stems of images/*.jpg and pkls/*.pkl (either may be missing), numeric ones in number order."""
    stems = set()
    for sub, ext in (("images", ".jpg"), ("pkls", ".pkl")):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            stems.update(n[:-len(ext)] for n in os.listdir(d) if n.endswith(ext) and len(n) > len(ext))
    return sorted(stems, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def check_dir(root: str) -> Optional[str]:
    """None if `root` looks like an ALIGN-BENCH dir, else why not (one line)."""
    if not os.path.isdir(root):
        return f"no such directory {root!r}"
    missing = [s for s in ("images", "pkls") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        return f"{root!r} has no {'/'.join(missing)}/ subdirectory (expected DIR/images/N.jpg and DIR/pkls/N.pkl)"
    return None


class AlignBenchReader:
    def __init__(self, root: str, tokenizer, image_size: int, grid: tuple[int, int], max_text_len: int,
                 max_image_pixels: int = 36_000_000):
        self.root, self.tokenizer, self.size, self.grid = root, tokenizer, image_size, tuple(grid)
        self.max_text_len, self.max_pixels = max_text_len, max_image_pixels
        self.marker = word_marker(tokenizer)

    def keys(self) -> list[str]:
        return list_keys(self.root)

    # --- pieces
    def _annotation(self, key: str) -> dict:
        path = os.path.join(self.root, "pkls", f"{key}.pkl")
        if not os.path.isfile(path):
            raise BadItem("missing_pkl", path)
        try:
            obj = safe_load_pickle(path)
        except RefusedPickle as e:
            raise BadItem("refused_pkl", f"{path}: {e}") from None
        except Exception as e:   # truncated / not a pickle / bad numpy payload
            raise BadItem("unreadable_pkl", f"{path}: {type(e).__name__}: {str(e)[:200]}") from None
        if not (isinstance(obj, dict) and isinstance(obj.get("caption"), str) and obj["caption"].strip()
                and isinstance(obj.get("annotation"), dict)):
            raise BadItem("bad_format", f"{path}: expected {{'caption': str, 'annotation': dict}}")
        if not obj["annotation"]:
            raise BadItem("no_annotation", path)
        return obj

    def _image(self, key: str) -> tuple[torch.Tensor, tuple[int, int], str]:
        import warnings

        from PIL import Image

        from .transforms import _resize, check_pixels

        path = os.path.join(self.root, "images", f"{key}.jpg")
        if not os.path.isfile(path):
            raise BadItem("missing_image", path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    check_pixels(*im.size, self.max_pixels)
                    im = im.convert("RGB")
                    w, h = im.size
                    a = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
        except Exception as e:
            raise BadItem("unreadable_image", f"{path}: {type(e).__name__}: {str(e)[:200]}") from None
        # Resize((S, S)) bicubic: the whole image squashed to a square, then CenterCrop(S) is a no-op
        return _resize(a.permute(2, 0, 1)[None], self.size, "bicubic").contiguous(), (h, w), path

    def _regions(self, phrase: str, raw, h: int, w: int) -> list[Region]:
        if not isinstance(raw, (list, tuple)) or not raw:
            raise BadItem("bad_format", f"phrase {phrase!r}: expected a non-empty list of regions")
        out = []
        for r in raw:
            if not isinstance(r, dict) or "bbox_mask" not in r or "pixel_mask" not in r:
                raise BadItem("bad_format", f"phrase {phrase!r}: a region lacks bbox_mask/pixel_mask")
            b = r["bbox_mask"]
            if torch.is_tensor(b) or isinstance(b, np.ndarray):
                b = b.tolist()
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)):
                raise BadItem("bad_format", f"phrase {phrase!r}: bbox_mask must be 4 numbers, got {b!r}")
            x1, y1, x2, y2 = (int(v) for v in b)   # int() as the released scripts
            if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
                raise BadItem("box_outside_image", f"phrase {phrase!r}: box {b!r} vs image {w}x{h}")
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            if x2 <= x1 or y2 <= y1:
                raise BadItem("empty_mask", f"phrase {phrase!r}: empty box {b!r}")
            m = _as_bool_mask(r["pixel_mask"])
            if m is None:
                raise BadItem("bad_format", f"phrase {phrase!r}: pixel_mask must be a 2-D array")
            if m.shape != (h, w):
                raise BadItem("mask_shape", f"phrase {phrase!r}: pixel_mask {m.shape} vs image {(h, w)}")
            bg = (y2 - y1) * (x2 - x1) > BACKGROUND_FRACTION * w * h
            out.append(Region((x1, y1, x2, y2), m, bg))
        return out

    def masks(self, regions: list[Region], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(box, pixel) unions at the original size, {0, 1} float (H, W)."""
        box = torch.zeros(h, w)
        pix = np.zeros((h, w), bool)
        for r in regions:
            x1, y1, x2, y2 = r.box
            box[y1:y2, x1:x2] = 1.0
            pix |= r.pixel
        return box, torch.from_numpy(pix).float()

    def _text(self, caption: str):
        tok = self.tokenizer
        enc = tok(caption, padding="max_length", truncation=True, max_length=self.max_text_len)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        n_real = int(sum(mask))
        full = tok(caption, add_special_tokens=False)["input_ids"]
        kept = n_real - 2   # caption tokens the model sees: positions 1 .. n_real - 2 (CLS first, SEP/</s> last)
        if full[:kept] != ids[1:1 + kept]:
            raise BadItem("bad_format", "the tokenizer does not frame a caption as [CLS] tokens [SEP]")
        tokens = tok.convert_ids_to_tokens(full)
        words = merge_words(tokens, self.marker)
        strings = word_strings(tok, tokens, words)
        return torch.tensor(ids), torch.tensor(mask), words, strings, kept

    def phrase_words(self, phrase: str) -> list[str]:
        tokens = self.tokenizer.tokenize(clean_caption(phrase))
        return word_strings(self.tokenizer, tokens, merge_words(tokens, self.marker))

    # --- the item
    def read(self, key: str) -> AlignItem:
        obj = self._annotation(key)
        pixels, (h, w), image_path = self._image(key)
        caption = clean_caption(obj["caption"])
        ids, mask, words, strings, kept = self._text(caption)
        regions_all: list[Region] = []
        parsed = []
        for phrase, raw in obj["annotation"].items():
            if not isinstance(phrase, str) or not phrase.strip():
                raise BadItem("bad_format", f"phrase {phrase!r} is not a non-empty string")
            regions = self._regions(phrase, raw, h, w)
            pw = self.phrase_words(phrase)
            start = find_phrase(strings, pw) if pw else -1
            if start < 0:
                raise BadItem("phrase_not_in_caption", f"{phrase!r} not in {caption!r}")
            box, pix = self.masks(regions, h, w)
            if not pix.any():
                raise BadItem("empty_mask", f"phrase {phrase!r}: its pixel masks are empty")
            regions_all.extend(regions)
            parsed.append((phrase, start, len(pw), regions, box, pix))
        phrases, skipped = [], {}
        for phrase, start, n, regions, box, pix in parsed:
            positions = [p for wd in words[start:start + n] for p in wd]
            if max(positions) >= kept:   # a word (or a piece of one) beyond the truncated text
                skipped[PHRASE_TRUNCATED] = skipped.get(PHRASE_TRUNCATED, 0) + 1
                continue
            phrases.append(Phrase(phrase, [p + 1 for p in positions], regions,
                                  resize_mask(box, self.grid), resize_mask(pix, self.grid)))
        fg = [r for r in regions_all if not r.background]
        if fg:
            gbox, gpix = self.masks(fg, h, w)
            global_box, global_pixel = resize_mask(gbox, self.grid), resize_mask(gpix, self.grid)
        else:
            global_box = global_pixel = None
        for r in regions_all:   # the full-size masks are not needed any more (visualisation draws boxes)
            r.pixel = r.pixel[:0, :0]
        return AlignItem(key, image_path, caption, (h, w), pixels, ids, mask, phrases, regions_all,
                         global_box, global_pixel, skipped)
