"""Oracle pseudo masks: the ground truth written in the pseudo-mask layout (docs/method.md, "Oracle pseudo masks").

A diagnostic, not the method: with `pseudo.oracle: true` the pseudo stage replaces the gradient-weighted
attention maps of the train split by the share of each patch that the ground truth gives to each concept, so that
`train` and `evaluate` run unchanged on perfect pseudo labels and measure what the decoder and its bootstrapping
can reach from them.

Which concept a class becomes: the concepts are ordered things first, then stuff (as the k-means centres are),
and the thing classes, in the order of the dataset's class list, become the thing concepts 0..K_t-1 in that
order, the stuff classes the stuff concepts K_t..K-1; a background class (things-only data) becomes no concept,
so that the training target's background channel (relu(0.1 - max_k P_k)) wins there. A dataset whose classes
are not split into things and stuff (Cityscapes' 27) maps class c to concept c. The evaluation matches the
decoder's channels to the classes with the Hungarian algorithm over the whole val set, which does not depend on
how the concepts are numbered: any one-to-one map between the classes and the concepts of the same kind gives the
same scores, and this one is the matching a decoder that learnt the oracle perfectly is given.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputValueError


def class_to_concept(task) -> np.ndarray:
    """The concept (0..K-1) each class of `task` becomes, -1 for a background class (module docstring). An
    InputValueError when the dataset's classes do not fill the task's thing and stuff concepts one to one."""
    n_classes = len(task.class_names)
    if not task.class_kinds:
        if n_classes != task.n_concepts:
            raise InputValueError(f"pseudo.oracle: {task.dataset} at granularity {task.granularity} has "
                                  f"{n_classes} classes for {task.n_concepts} concepts and does not say which are "
                                  f"things: oracle masks need one class per concept")
        return np.arange(n_classes)
    kinds = list(task.class_kinds)
    n_things, n_stuff = kinds.count("thing"), kinds.count("stuff")
    if (n_things, n_stuff) != (task.n_things, task.n_stuff):
        raise InputValueError(f"pseudo.oracle: {task.dataset} at granularity {task.granularity} has {n_things} "
                              f"thing and {n_stuff} stuff classes for {task.n_things} thing and {task.n_stuff} "
                              f"stuff concepts: oracle masks need one class per concept")
    mapping = np.full(n_classes, -1, dtype=np.int64)
    things = [c for c, k in enumerate(kinds) if k == "thing"]
    stuff = [c for c, k in enumerate(kinds) if k == "stuff"]
    mapping[things] = np.arange(len(things))
    mapping[stuff] = task.n_things + np.arange(len(stuff))
    return mapping


def oracle_mask_parts(label: torch.Tensor, concept_of_class: torch.Tensor, n_concepts: int, patch: int):
    """The oracle's pseudo-mask parts for labels (B, R, R) of class ids (values outside [0, n_classes) are
    unlabelled): attention (B, h, w) zero and gradient (B, K, h, w) = the share of each patch's pixels whose class
    becomes concept k, so that P_k = attention + gradient_k is that share (transfgu.pseudo.assemble_pseudo_masks).
    Unlabelled pixels and background classes count for no concept: a patch with none of them has zero maps."""
    B, R, _ = label.shape
    label = label.long()
    valid = (label >= 0) & (label < len(concept_of_class))
    concept = torch.where(valid, concept_of_class.to(label.device)[label.clamp(0, len(concept_of_class) - 1)],
                          torch.full_like(label, -1))
    onehot = torch.zeros(B, n_concepts + 1, R, R, device=label.device)
    onehot.scatter_(1, (concept + 1)[:, None], 1.0)  # channel 0: no concept (-1)
    share = F.avg_pool2d(onehot[:, 1:], patch)  # (B, K, h, w): exact area fractions, patches do not overlap
    return torch.zeros(B, R // patch, R // patch, device=label.device), share
