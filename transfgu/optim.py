"""Optimiser helpers: the parameter groups shared by the decoder training and DINO pretraining, and DINO's
per-parameter gradient clipping."""
from __future__ import annotations

import torch


def decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two groups, decayed first: weight matrices with `weight_decay`; biases and norm parameters (1-d)
    with none. Parameters that do not require gradients are left out."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_each_(parameters, max_norm: float) -> None:
    """Scale each parameter's gradient to an L2 norm of at most `max_norm` (DINO's per-parameter clipping:
    g *= min(1, max_norm / (|g| + 1e-6))), in a few fused kernels for all parameters and without reading a value
    back to the host (one `clip_grad_norm_` per parameter launches about six kernels each)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
