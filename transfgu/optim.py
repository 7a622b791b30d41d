"""Optimiser parameter groups shared by the decoder training and DINO pretraining."""
from __future__ import annotations


def decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two groups, decayed first: weight matrices with `weight_decay`; biases and norm parameters (1-d)
    with none. Parameters that do not require gradients are left out."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
