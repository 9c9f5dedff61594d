"""Per-layer activation checkpointing hook.

The policy (which towers, how many layers) is decided outside the model: the engine sets
`layer.activation_checkpointing = True` on layers from `VLPModel.layer_stacks()`. Towers call `run_layer` for every
layer so they honour that flag. Non-reentrant checkpointing keeps one autograd graph per step, which avoids the
ZeRO-2 "gradient computed twice for this partition" assertion when a layer is used several times in one step.
"""
import torch
from torch.utils.checkpoint import checkpoint


def run_layer(layer, fn, *args):
    if getattr(layer, "activation_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
