"""Synthetic official SCL/GLSCL checkpoints for tests/train/test_scl_import.py, built from the released file's
manifest (scl_manifest.py): full-size (zero-memory constant views) or proportionally shrunk (same key names, small
widths, fewer layers), wrapped as Lightning 1.x or 2.x writes them; and a tiny local RoBERTa-style tokenizer."""
from __future__ import annotations

import math
import os
import re

import torch

import scl_manifest

# Shrunk sizes: every width 128 (2 heads at 64 per head in the towers; the fusion gets 4 from hyper_parameters so a
# wrong head count there shows), FFN 512, 2 text layers / 2 CLIP blocks / 2 fusion layers, 64 px images (4 x 4
# patches of 16), 300 tokens, 58 text positions (56 + RoBERTa's 2 unused rows), ITC dim 48.
H, FFN, VOCAB, TEXT_POS, IMG, PATCH, ITC_DIM = 128, 512, 300, 58, 64, 16, 48
TEXT_LAYERS, BLOCKS, FUSION_LAYERS, FUSION_HEADS = 2, 2, 2, 4
GRID = IMG // PATCH
_DIMS = {768: H, 3072: FFN, 2304: 3 * H, 1536: 2 * H, 50265: VOCAB, 514: TEXT_POS, 325: 1 + GRID * GRID,
         512: ITC_DIM}
_MAE_DIMS = {512: 32, 1536: 96, 2048: 128, 768: 48, 325: 1 + GRID * GRID}   # the dropped MAE decoder: any sizes
_LAYER = [(r"text_transformer\.encoder\.layer\.(\d+)\.", TEXT_LAYERS), (r".*resblocks\.(\d+)\.", BLOCKS),
          (r"cross_modal_\w+_layers\.(\d+)\.", FUSION_LAYERS), (r"vision_transformer\.decoder_blocks\.(\d+)\.", 1)]
VISION = "vision_transformer.visual."


def full_rows():
    return scl_manifest.rows()


def shrunk_rows():
    """The manifest with every width mapped by _DIMS (patch size 16 and the 3 colour channels stay) and the layers
    beyond the shrunk counts left out."""
    out = []
    for name, shape, dtype in scl_manifest.rows():
        if any((m := re.match(p, name)) and int(m.group(1)) >= n for p, n in _LAYER):
            continue
        mae = name.startswith("vision_transformer.") and not name.startswith(VISION)
        dims = _MAE_DIMS if mae else _DIMS
        out.append((name, tuple(dims.get(d, d) for d in shape), dtype))
    return out


def random_state_dict(rows, seed: int = 0, dtype=None) -> dict:
    """Random official weights at scales that keep a forward pass well conditioned (LayerNorm weights near 1, linear
    weights ~ 1/sqrt(fan_in)); cl_temp 0.0731; position_ids an arange. dtype: cast floating tensors (fp16 files)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, dt in rows:
        if dt == "int64":
            t = torch.arange(shape[-1]).expand(shape).clone()
        elif name == "cl_temp":
            t = torch.tensor(0.0731)
        elif len(shape) == 1 and name.endswith(".weight"):   # every 1-D weight of the layout is a LayerNorm's
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and name.endswith("weight") and "embeddings" not in name:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:   # biases, embeddings, class/position/mask tokens
            t = 0.1 * torch.randn(shape, generator=g)
        sd[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return sd


def constant_state_dict(rows) -> dict:
    """Entry i = the constant i + 1 expanded to its shape (no memory): a full-size file's keys and shapes, each
    tensor recognisable by value."""
    return {name: (torch.tensor(float(i + 1)) if dt != "int64" else torch.tensor(i + 1)).expand(shape)
            for i, (name, shape, dt) in enumerate(rows)}


def hp_config(mltc: bool = True, num_heads: int = FUSION_HEADS) -> dict:
    """hyper_parameters['config'] as the official pretraining config has it (the entries the importer reads)."""
    return {"exp_name": "mlm_itm_cl_mgsc_mltc", "loss_names": {"itm": 1, "mlm": 1, "vqa": 0, "nlvr2": 0, "irtr": 0,
                                                                "mae": 0, "con": 1, "mgsc": 1, "mltc": int(mltc)},
            "image_size": IMG, "patch_size": PATCH, "vocab_size": VOCAB, "max_text_len": 50, "hidden_size": H,
            "num_layers": TEXT_LAYERS, "num_top_layer": FUSION_LAYERS, "num_heads": num_heads, "mlp_ratio": 4,
            "tokenizer": "roberta-base", "precision": 16}


def lightning1(sd: dict, hp: dict) -> dict:
    """The Lightning 1.3 checkpoint dict: callbacks keyed by a CLASS (scl_fake_lightning.ModelCheckpoint), objects
    of that module inside, optimizer and AMP state, hyper_parameters = {'config': ...}."""
    import scl_fake_lightning as fake

    return {"epoch": 9, "global_step": 100000, "pytorch-lightning_version": "1.3.2", "state_dict": sd,
            "callbacks": {fake.ModelCheckpoint: {"monitor": "val/the_metric", "best_model_score": torch.tensor(0.5),
                                                 "best_model_path": "result/epoch=9.ckpt",
                                                 "owner": fake.ModelCheckpoint(), "hook": fake.Hook()}},
            "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.98), "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 100000, "_step_count": 100001, "lr_lambdas": [None]}],
            "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
            "hparams_name": "kwargs", "hyper_parameters": {"config": hp}}


def lightning2(sd: dict, hp: dict) -> dict:
    """The Lightning 2.x checkpoint dict: callbacks keyed by strings, `loops`; plain data only."""
    return {"epoch": 9, "global_step": 100000, "pytorch-lightning_version": "2.1.0", "state_dict": sd,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val/the_metric', 'mode': 'max'}": {"best_model_path": "x"}},
            "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"config": hp}}


def write_tokenizer(directory) -> str:
    """A RoBERTa tokenizer with a 261-token byte-level vocab (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=260)."""
    from transformers import RobertaTokenizer

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    # GPT-2's byte-to-unicode alphabet: printable bytes stand for themselves, the others for chr(256 + n)
    printable = [b for b in range(256) if chr(b).isprintable() and b != 32 and not 127 <= b <= 160 and b != 173]
    chars, n = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + n))
        n += b not in printable
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + sorted(set(chars)) + ["<mask>"])}
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return directory
