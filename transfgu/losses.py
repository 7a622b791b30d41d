"""Training targets and the three losses of TransFGU (docs/method.md section 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image's pseudo maps over its whole (K, h, w) tensor to [0, 1]."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scale = (hi - lo).clamp_min(1e-12)
    return (maps - lo.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)


def soft_targets(maps: torch.Tensor, things_only: bool, teacher_logits: torch.Tensor | None = None,
                 teacher_weight: float = 0.5, bg_threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel class scores the student is trained towards.

    maps: raw pseudo maps (B, K, h, w). Things-only: a background map relu(bg_threshold - max_k P_k)
    is prepended as channel 0. With a teacher: (1 - w) * maps + w * softmax(teacher)."""
    target = normalize_maps(maps)
    if things_only:
        background = torch.relu(bg_threshold - target.amax(1, keepdim=True))
        target = torch.cat([background, target], dim=1)
    if teacher_logits is not None:
        target = (1 - teacher_weight) * target + teacher_weight * teacher_logits.softmax(1)
    return target


def loss_cat(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.0,
             permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy to argmax(target); while bootstrapping minus alpha * CE to the argmax of the
    target with its channels permuted (a negative label)."""
    loss = F.cross_entropy(logits, target.argmax(1))
    if alpha and permutation is not None:
        loss = loss - alpha * F.cross_entropy(logits, target[:, permutation].argmax(1))
    return loss


def loss_uncertainty(logits: torch.Tensor, foreground: torch.Tensor | None = None) -> torch.Tensor:
    """1 - (p1 - p2), p1 >= p2 the two largest softmax probabilities per pixel, averaged.

    Things-only: pass logits without the background channel and a (B, h, w) foreground mask; only
    foreground pixels count."""
    top2 = logits.softmax(1).topk(2, dim=1).values
    margin = 1 - (top2[:, 0] - top2[:, 1])
    if foreground is None:
        return margin.mean()
    if not foreground.any():
        return margin.sum() * 0
    return margin[foreground].mean()


def loss_cls_emb(class_feat: torch.Tensor) -> torch.Tensor:
    """1 + cos over every pair of distinct (normalised) class features, averaged: pushes them apart."""
    B, K, _ = class_feat.shape
    cos = class_feat @ class_feat.transpose(1, 2)
    off_diag = ~torch.eye(K, dtype=torch.bool, device=class_feat.device)
    return (1 + cos[:, off_diag]).mean()
