"""Training FLOPs per sample (forward + backward) of our shared-pass step vs the official SCL code's pass structure.

    python train/flops.py --config train/configs/glscl_4m.yaml [--batch 2] [key=value ...]

Counted with torch.utils.flop_counter.FlopCounterMode on CPU at the config's model size (weights do not matter:
a text tower that names a missing local dir is built by random init at that architecture's size, a missing vision
file or image-tokenizer file likewise; the DALL-E dVAE stand-in has the real size: hidden 256, 2 blocks per group,
8192 codes). Counted FLOPs are those of matmuls/convolutions/attention (what FlopCounterMode counts); elementwise ops
are not counted. The image tokenizer's forward (SIMLA's frozen dVAE, run on the tokenizer view every step) IS counted,
inside the objective that runs it, and shown on its own line as well.

Nothing here names an objective: the groups and parts come from what the objectives declare (models/passes.py kinds).

ours      one training step as VLPModel runs it: each shared pass is computed once per step and reused by every
          objective that reads it (for GLSCL: the unmasked encodings, and MGSC/MLTC's masked passes A/B); the last
          fusion layer computes only the tokens a pass's objective reads (ITM: CLS only; MLM: text only; ...).
official  the released code's structure, by model family:
          coattention (SCL): every group of objectives (below) gets a fresh StepContext, i.e. re-encodes both
            modalities; each objective runs at its `official_config` (ITM: one fusion pass of B pairs, whatever the
            config says); every fusion pass computes all tokens of both streams.
          single_stream (SIMLA): one forward that encodes each modality once and shares it (as ours), at the
            configured settings (the SIMLA configs set the released code's: ITM 3B pairs ...); every pass through
            the BERT computes all tokens in its last layer (no pruning to the CLS).

Attribution (every number is forward + backward, per sample, except the "fwd" split of a group):
  ours:     "pass:<name>" = a shared pass: the unmasked encoders ("encoding" kind: forward + the backward of the
            gradients all objectives send them) or a pass without gradient (momentum encoders: forward only);
            each group = its objectives' own forward + backward, up to the encodings (which they see as leaves).
            Objectives reading the same shared pass with gradient form one group ("mgsc+mltc": passes A/B), shown
            with its forward split.
  official: each group = a full forward + backward from a fresh context (encoders included).
The per-part numbers sum exactly to the totals; `ratio` (last line) = ours total / official total.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts attention on CPU. torch registers formulas for the CUDA attention kernels but
    not for the CPU one that F.scaled_dot_product_attention runs without dropout (`_scaled_dot_product_flash_
    attention_for_cpu`: timm's ViT, every attention in eval or with dropout 0), so those FLOPs were silently 0 on
    CPU; they get torch's own SDPA formulas (the backward counts the recomputed scores, as on CUDA). With attention
    dropout, CPU SDPA runs the decomposed math (bmm: counted as such)."""
    from torch.utils import flop_counter as fcm

    def forward(query, key, value, *args, out_shape=None, **kwargs):   # (shapes)
        return fcm.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fcm.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


# Sizes of text towers that a config may name as a missing local directory.
_TEXT_ARCHS = {
    "roberta-base": dict(arch="roberta", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                         vocab_size=50265, max_position_embeddings=512),
    "roberta-large": dict(arch="roberta", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                          vocab_size=50265, max_position_embeddings=512),
    "bert-base": dict(arch="bert", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512),
    "bert-large": dict(arch="bert", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                       vocab_size=30522, max_position_embeddings=512),
}


class _SyntheticTokenizer:
    """The tokenizer attributes VLPModel and the batch builder need, for a tower we build by random init."""

    def __init__(self, arch: str, vocab_size: int):
        self.vocab_size = vocab_size
        if arch == "roberta":
            self.cls_token_id, self.pad_token_id, self.sep_token_id, unk = 0, 1, 2, 3
            self.mask_token_id = vocab_size - 1
        else:
            self.pad_token_id, unk, self.cls_token_id, self.sep_token_id, self.mask_token_id = 0, 100, 101, 102, 103
        self.all_special_ids = sorted({self.cls_token_id, self.pad_token_id, self.sep_token_id, unk,
                                       self.mask_token_id})

    def __len__(self) -> int:
        return self.vocab_size

    def convert_ids_to_tokens(self, ids):
        """Token strings as the MLM objective's released masking rule reads them: BERT's [CLS]/[SEP] by name, no
        "##" pieces (whole-word grouping has nothing to group in a synthetic vocabulary)."""
        names = {self.cls_token_id: "[CLS]", self.sep_token_id: "[SEP]"} if self.cls_token_id == 101 else {}
        return [names.get(i, f"t{i}") for i in ids]


def _is_local(name) -> bool:
    return name is not None and (name == "minilm" or Path(name).is_dir())


def prepare_model_config(cfg, log=print):
    """-> (model config, tokenizer); a text tower naming a missing local dir becomes a random init at its size."""
    from models.text import load_tokenizer

    vision = cfg.model.vision
    if vision.pretrained and not os.path.isfile(vision.pretrained):
        log(f"note: model.vision.pretrained {vision.pretrained!r} is not a file: random init at the same size")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 vision=dataclasses.replace(vision, pretrained=None)))
    text = cfg.model.text
    name = text.pretrained if text.pretrained is not None else text.tokenizer
    if _is_local(text.pretrained) or (text.pretrained is None and _is_local(text.tokenizer)):
        return cfg.model, load_tokenizer(text)
    key = os.path.basename(str(name).rstrip("/")).lower()
    match = next((k for k in _TEXT_ARCHS if key.startswith(k)), None)
    if match is None:
        match = "roberta-base" if "roberta" in key else "bert-base"
    sizes = _TEXT_ARCHS[match]
    new_text = dataclasses.replace(text, pretrained=None, tokenizer="<synthetic>", dropout=text.dropout, **sizes)
    log(f"note: model.text {name!r} is not a local directory: counting a random-init {match} "
        f"({sizes['hidden_size']}d, {sizes['num_layers']} layers, vocab {sizes['vocab_size']}) with a synthetic "
        f"tokenizer (FLOPs do not depend on weights)")
    return dataclasses.replace(cfg.model, text=new_text), _SyntheticTokenizer(sizes["arch"], sizes["vocab_size"])


# The DALL-E dVAE encoder's size (openai/DALL-E encoder.pkl: n_hid 256, n_blk_per_group 2, vocab 8192)
DALLE_DVAE = dict(hidden=256, blocks_per_group=2, vocab_size=8192)


def prepare_objectives(objectives: dict, log=print) -> tuple[dict, dict]:
    """-> (objective configs, {objective name: dVAE sizes}): an objective whose image `tokenizer` file is missing is
    built with a random tokenizer of the DALL-E dVAE's vocabulary instead (its head is sized by it); `swap_tokenizers`
    then gives it a random dVAE of the real size, so the tokenizer's forward FLOPs are the real ones."""
    import typing

    out, stand_ins = {}, {}
    for name, c in objectives.items():
        path = getattr(c, "tokenizer", None)
        if hasattr(c, "random_tokenizer") and isinstance(path, str) and not os.path.isfile(path):
            hint = typing.get_type_hints(type(c))["random_tokenizer"]   # Optional[<its random tokenizer config>]
            RandomTokenizerConfig = next(a for a in typing.get_args(hint) if a is not type(None))
            log(f"note: objectives.{name}.tokenizer {path!r} is not a file: counting a random-init dVAE of the "
                f"DALL-E encoder's size (hidden {DALLE_DVAE['hidden']}, {DALLE_DVAE['blocks_per_group']} blocks per "
                f"group, {DALLE_DVAE['vocab_size']} codes); its forward on the tokenizer view is counted")
            c = dataclasses.replace(c, tokenizer=None, random_tokenizer=RandomTokenizerConfig(
                vocab_size=DALLE_DVAE["vocab_size"], hidden=4))
            stand_ins[name] = dict(DALLE_DVAE)
        out[name] = c
    return out, stand_ins


def swap_tokenizers(model, stand_ins: dict) -> None:
    """Give the objectives named in `stand_ins` a frozen random dVAE of those sizes (see prepare_objectives)."""
    from models.dvae import DVAEEncoder, _freeze

    for name, sizes in stand_ins.items():
        obj = model.objectives[name]
        attr = next(k for k, v in vars(obj).items() if isinstance(v, DVAEEncoder))
        object.__setattr__(obj, attr, _freeze(DVAEEncoder(**sizes)))


def image_tokenizers(model) -> dict:
    """{objective name: its image tokenizer (a models.dvae.DVAEEncoder held outside the module tree)}."""
    from models.dvae import DVAEEncoder

    return {name: v for name, obj in model.objectives.items() for v in vars(obj).values()
            if isinstance(v, DVAEEncoder)}


def synthetic_batch(tokenizer, batch_size: int, frames: int, image_size: int, max_len: int, real_frac=0.6,
                    seed: int = 0, tokenizer_view: int | None = None) -> dict:
    """tokenizer_view: the side of the image tokenizer's view (`data.tokenizer_view.size`); adds
    `tokenizer_pixels` (B, 3, S, S) in [0, 1], as the data pipeline does."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    lo = max(i for i in special if i < 1000) + 1 if any(i < 1000 for i in special) else 0
    n_real = max(3, min(max_len, round(real_frac * max_len)))
    ids = torch.full((batch_size, max_len), tokenizer.pad_token_id, dtype=torch.long)
    words = torch.randint(lo, len(tokenizer) - 1, (batch_size, n_real - 2), generator=g)
    words[torch.isin(words, torch.tensor(sorted(special)))] = lo
    ids[:, 0] = tokenizer.cls_token_id
    ids[:, 1:n_real - 1] = words
    ids[:, n_real - 1] = tokenizer.sep_token_id
    mask = torch.zeros(batch_size, max_len, dtype=torch.long)
    mask[:, :n_real] = 1
    batch = {"pixel_values": torch.randn(batch_size, frames, 3, image_size, image_size, generator=g),
             "input_ids": ids, "attention_mask": mask}
    if tokenizer_view:
        batch["tokenizer_pixels"] = torch.rand(batch_size, 3, tokenizer_view, tokenizer_view, generator=g)
    return batch


def tokenizer_view_size(data_cfg) -> int | None:
    tv = getattr(data_cfg, "tokenizer_view", None)
    return tv.size if tv is not None else None


def _loss(model, name, out):
    return model.weights[name] * sum(out.losses.values())


def _groups(model) -> list[list[str]]:
    """Objectives that read the same shared pass with gradient ("pass" kind: GLSCL's A/B) backpropagate together:
    one group per connected set, in run order."""
    groups: list[tuple[set, list[str]]] = []
    for name, obj in model.objectives.items():
        shared = {k.name for k in type(obj).reads if model.passes[k.name].kind == "pass"}
        joined = [g for g in groups if g[0] & shared]
        keys, members = set(shared), []
        for g in joined:
            keys |= g[0]
            members += g[1]
            groups.remove(g)
        groups.append((keys, members + [name]))
    order = list(model.objectives)
    return sorted((sorted(m, key=order.index) for _, m in groups), key=lambda m: order.index(m[0]))


def _seed_for(model, name: str) -> None:
    """Seed torch's generator before objective `name` runs, on both sides: their random draws (MLM's masked token
    count decides its vocabulary head's cost) must not depend on how much randomness the passes before them used
    (dropout over pruned vs full last layers, re-encoded groups)."""
    torch.manual_seed(1000 + list(model.objectives).index(name))


def _leaf(value):
    """The value with every tensor replaced by a detached leaf that requires grad, and the (tensor, leaf) pairs."""
    if torch.is_tensor(value):
        leaf = value.detach().requires_grad_()
        return leaf, [(value, leaf)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        fields, pairs = {}, []
        for f in value._fields:
            fields[f], p = _leaf(getattr(value, f))
            pairs += p
        return type(value)(**fields), pairs
    return value, []


def _count_ours(model, batch):
    from models.passes import StepContext

    parts, fwd_split = {}, {}
    with flop_counter() as fc:
        def now():
            return fc.get_total_flops()
        ctx = StepContext(model, batch)
        # Unmasked encodings: computed once; objectives see them as leaves, and the gradients every objective sends
        # them go through the encoders once. Passes without gradient (momentum encoders) are forward only.
        leaves = {}
        for name, p in model.passes.items():
            if p.kind in ("encoding", "no_grad"):
                start = now()
                value = ctx.get(type(p))
                parts[f"pass:{name}"] = now() - start
                if p.kind == "encoding":
                    ctx.values[name], leaves[name] = _leaf(value)
        for group in _groups(model):
            start = now()
            loss = 0.0
            for name in group:
                s = now()
                _seed_for(model, name)
                loss = loss + _loss(model, name, model.objectives[name](ctx))
                fwd_split[name] = now() - s
            loss.backward()
            parts["+".join(group)] = now() - start
        for name, pairs in leaves.items():
            start = now()
            grads = [(t, l.grad) for t, l in pairs if l.grad is not None]
            if grads:
                torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
            parts[f"pass:{name}"] += now() - start
        total = now()
    return parts, fwd_split, total


@contextlib.contextmanager
def _full_fusion_outputs(model):
    """The official code computes every token of both streams in every fusion pass (no last-layer pruning); in the
    single-stream family every pass through the BERT (online or momentum copy) computes all tokens of its last
    layer."""
    if model.family == "single_stream":
        from models.single_stream import SingleStreamBert
        patched = [m for m in model.modules() if isinstance(m, SingleStreamBert)]

        def full_of(forward):
            def full(*args, **kw):
                kw["last_queries"] = None
                return forward(*args, **kw)
            return full
    else:
        patched = [model.fusion]

        def full_of(forward):
            def full(*args, **kw):
                kw["text_out"] = kw["image_out"] = "all"
                return forward(*args, **kw)
            return full
    for m in patched:
        m.forward = full_of(m.forward)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _official_configs(model):
    """Each objective at the setting the official code's cost corresponds to (`Objective.official_config`)."""
    saved = {n: o.cfg for n, o in model.objectives.items()}
    try:
        for o in model.objectives.values():
            o.cfg = type(o).official_config(o.cfg)
        yield
    finally:
        for n, o in model.objectives.items():
            o.cfg = saved[n]


def _count_official(model, batch):
    if model.family == "single_stream":   # SIMLA's released code: one forward with shared encodings
        with _full_fusion_outputs(model):
            return _count_ours(model, batch)
    from models.passes import StepContext

    parts, fwd_split = {}, {}
    with _official_configs(model), _full_fusion_outputs(model), flop_counter() as fc:
        for group in _groups(model):
            start = fc.get_total_flops()
            ctx = StepContext(model, batch)  # fresh: nothing shared with the other groups
            loss = 0.0
            for name in group:
                s = fc.get_total_flops()
                _seed_for(model, name)
                loss = loss + _loss(model, name, model.objectives[name](ctx))
                fwd_split[name] = fc.get_total_flops() - s
            loss.backward()
            parts["+".join(group)] = fc.get_total_flops() - start
        total = fc.get_total_flops()
    return parts, fwd_split, total


def count_flops(cfg, batch_size: int = 2, seed: int = 0, official_settings: bool = False, log=print) -> dict:
    """-> {"ours": {...}, "official": {...}}, each {"parts": {name: FLOPs per sample, fwd+bwd},
    "fwd": {objective: forward FLOPs per sample}, "total": FLOPs per sample}. `official_settings`: ours runs every
    objective at its official setting too (`Objective.official_config`)."""
    from models.objectives import OBJECTIVES
    from models.vlp import build_model

    model_cfg, tokenizer = prepare_model_config(cfg, log)
    objectives, stand_ins = prepare_objectives(dict(cfg.objectives), log)
    if official_settings and official_settings_apply(model_cfg.family):
        objectives = {n: OBJECTIVES[n].official_config(c) for n, c in objectives.items()}
    torch.manual_seed(seed)
    model = build_model(model_cfg, objectives, tokenizer).train()
    swap_tokenizers(model, stand_ins)
    batch = synthetic_batch(tokenizer, batch_size, getattr(cfg.data, "num_frames", 1) or 1, cfg.data.image_size,
                            cfg.data.max_text_len, seed=seed, tokenizer_view=tokenizer_view_size(cfg.data))
    result = {"tokenizers": {}}
    for name, dvae in image_tokenizers(model).items():   # its forward alone (no gradient), also inside `name`
        with flop_counter() as fc:
            dvae.codes(batch["tokenizer_pixels"])
        result["tokenizers"][name] = fc.get_total_flops() / batch_size
    for side, fn in (("ours", _count_ours), ("official", _count_official)):
        torch.manual_seed(seed)
        parts, fwd, total = fn(model, batch)
        model.zero_grad(set_to_none=True)
        result[side] = {"parts": {k: v / batch_size for k, v in parts.items()},
                        "fwd": {k: v / batch_size for k, v in fwd.items()}, "total": total / batch_size}
    return result


def official_settings_apply(family: str) -> bool:
    """Objectives' `official_config` describe the released SCL code (the coattention family); the single-stream
    family's released code is SIMLA's, whose settings are the ones its configs set."""
    return family != "single_stream"


def format_table(res: dict) -> list[str]:
    g = 1e9
    names = list(dict.fromkeys(list(res["ours"]["parts"]) + list(res["official"]["parts"])))
    lines = [f"{'GFLOPs/sample (fwd+bwd)':<26}{'ours':>12}{'official':>12}"]
    for n in names:
        o, f = res["ours"]["parts"].get(n), res["official"]["parts"].get(n)
        fmt = lambda v: f"{v / g:12.2f}" if v is not None else f"{'-':>12}"
        lines.append(f"{n:<26}{fmt(o)}{fmt(f)}")
        if "+" in n:
            for sub in n.split("+"):
                lines.append(f"{'  ' + sub + ' (fwd only)':<26}{res['ours']['fwd'][sub] / g:12.2f}"
                             f"{res['official']['fwd'][sub] / g:12.2f}")
    lines.append(f"{'total':<26}{res['ours']['total'] / g:12.2f}{res['official']['total'] / g:12.2f}")
    for name, f in res.get("tokenizers", {}).items():
        lines.append(f"  {name} includes its image tokenizer's forward (dVAE, no gradient): {f / g:.2f} GFLOPs/sample "
                     f"(both columns)")
    return lines


def main(argv=None) -> int:
    from train.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. objectives.itm.pairs=b")
    args = ap.parse_args(argv)
    if args.batch < 2:
        ap.error("--batch must be >= 2 (ITM draws negatives within the batch)")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    res = count_flops(cfg, args.batch)
    if official_settings_apply(cfg.model.family):
        official = "fresh encoders per objective group, each at its official setting (the released SCL code)"
    else:
        official = ("shared encodings, every BERT pass computing all its last layer's tokens, at the configured "
                    "settings (the released SIMLA code)")
    print(f"config {args.config}, batch {args.batch}; ours = shared passes (as trained), official = {official}")
    print("\n".join(format_table(res)))
    ratio = res["ours"]["total"] / res["official"]["total"]
    from models.objectives import OBJECTIVES
    differ = [f"objectives.{n}" for n, c in cfg.objectives.items() if OBJECTIVES[n].official_config(c) != c]
    if not official_settings_apply(cfg.model.family):
        differ = []
    if differ:
        alt = count_flops(cfg, args.batch, official_settings=True, log=lambda *_: None)
        print(f"note: {', '.join(differ)} cost more than the official code's setting (e.g. objectives.itm.pairs=3b: "
              f"3B fusion pairs vs B); at the official settings ours would be {alt['ours']['total'] / 1e9:.2f} "
              f"GFLOPs/sample, ratio {alt['ours']['total'] / alt['official']['total']:.4f}")
    print(f"ratio: {ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
