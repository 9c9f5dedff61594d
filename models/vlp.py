"""The pretraining model: the shared backbone plus the configured objectives, composed from their declarations.

It names no objective. Each enabled objective (models/objectives/__init__.py's registry) declares the backbone heads
it uses, the shared passes it reads and publishes (models/passes.py); this module builds the heads, one instance of
every declared pass, the momentum (EMA) copies those passes need, and runs the objectives in an order where every
publisher precedes its readers. A `StepContext` computes each shared pass at most once per step.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from models.backbone import HEADS, ModelConfig, VLPBackbone  # noqa: F401 (ModelConfig, VLPBackbone re-exported)
from models.objectives import OBJECTIVES
from models.objectives.base import BuildEnv
from models.passes import StepContext


def resolve_objectives(names) -> list[type]:
    """The enabled objective classes in run order: registry order, except that publishers precede readers."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"objectives: unknown {sorted(unknown)}; known: {sorted(OBJECTIVES)}")
    if not names:
        raise ValueError("objectives: enable at least one objective")
    pending = [cls for n, cls in OBJECTIVES.items() if n in names]
    publishers: dict[str, str] = {}
    for cls in pending:
        for kind in cls.publishes:
            if kind.name in publishers:
                raise ValueError(f"objectives {publishers[kind.name]} and {cls.name} both publish the shared pass "
                                 f"{kind.name!r}; enable one of them")
            publishers[kind.name] = cls.name
    order: list[type] = []
    while pending:
        done = {c.name for c in order}
        ready = next((c for c in pending if all(publishers.get(k.name, c.name) in done | {c.name} for k in c.reads)),
                     None)
        if ready is None:
            raise ValueError(f"objectives: circular dependency between {[c.name for c in pending]}")
        order.append(ready)
        pending.remove(ready)
    return order


def check_families(names, family: str) -> None:
    wrong = [n for n in names if n in OBJECTIVES and family not in OBJECTIVES[n].families]
    if wrong:
        raise ValueError(f"objectives.{wrong[0]}: works with model.family "
                         f"{' or '.join(OBJECTIVES[wrong[0]].families)}, not {family!r}")


def heads_needed(names) -> list[str]:
    need = {h for n in names for h in OBJECTIVES[n].heads}
    return [h for h in HEADS if h in need]


class VLPModel(VLPBackbone):
    def __init__(self, cfg: ModelConfig, objective_cfgs: dict, tokenizer):
        classes = resolve_objectives(list(objective_cfgs))
        check_families(objective_cfgs, cfg.family)
        need = heads_needed(objective_cfgs)
        heads = need if cfg.heads is None else list(cfg.heads)
        missing = [h for h in need if h not in heads]
        if missing:
            raise ValueError(f"model.heads: the enabled objectives need {missing} too")
        super().__init__(cfg, heads)
        if len(tokenizer) > self.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text model only {self.text.vocab_size}")
        env = BuildEnv(self, tokenizer)
        objectives = {}
        for cls in classes:
            objectives[cls.name] = cls(objective_cfgs[cls.name], env)
            for kind in cls.reads + cls.publishes:
                env.use(kind)
        self.objectives = nn.ModuleDict(objectives)
        self.passes = nn.ModuleDict(env.passes)   # no parameters; buffers follow the device
        self.weights = {n: float(objective_cfgs[n].weight) for n in self.objectives}
        self.momentum = self._build_momentum(env)

    def _build_momentum(self, env: BuildEnv) -> Optional[nn.Module]:
        names = [m for p in self.passes.values() for m in p.momentum_modules] + list(env.momentum_modules)
        if not names:
            return None
        from models.momentum import MomentumCopies

        coefficients = {p.settings["coefficient"] for p in self.passes.values() if p.momentum_modules}
        coefficients |= set(env.momentum_modules.values())
        if len(coefficients) != 1:
            raise ValueError(f"momentum encoders: the objectives ask for different coefficients {sorted(coefficients)}")
        return MomentumCopies(self, list(dict.fromkeys(names)), coefficients.pop())

    def pretrain_only_prefixes(self) -> tuple[str, ...]:
        return pretrain_only_prefixes(self.objectives)

    def forward(self, batch: dict) -> dict:
        ctx = StepContext(self, batch)
        losses, stats = {}, {}
        total = 0.0
        for name, objective in self.objectives.items():
            out = objective(ctx)
            total = total + self.weights[name] * sum(out.losses.values())
            losses.update(out.losses)
            stats.update(out.stats)
        return {"loss": total, "losses": losses, "stats": stats}

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        for name, objective in self.objectives.items():
            names |= {f"objectives.{name}.{n}" for n in objective.no_weight_decay()}
        return names


def pretrain_only_prefixes(objective_names) -> tuple[str, ...]:
    """State-dict prefixes only pretraining uses: the objectives that declare themselves pretraining-only, and the
    momentum copies (a task that wants momentum encoders re-copies them from the online weights, as ALBEF does)."""
    return tuple(f"objectives.{n}." for n in objective_names if OBJECTIVES[n].pretrain_only) + ("momentum.",)


def build_model(cfg: ModelConfig, objective_cfgs: dict, tokenizer) -> VLPModel:
    return VLPModel(cfg, objective_cfgs, tokenizer)
