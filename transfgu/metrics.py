"""Confusion matrix, Hungarian matching of clusters to classes, mIoU and pixel accuracy (docs/method.md section 5)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def upsample_argmax(scores: torch.Tensor, size, max_elements: int = 2 ** 27) -> torch.Tensor:
    """argmax over channels of `scores` (B, C, h, w) upsampled bilinearly to `size` (align_corners=False):
    (B, H, W). Upsamples a few images at a time so that at most `max_elements` values exist at once (the whole
    batch of 32 images x 171 maps at 320 x 320 would take 2.2 GB); same result as one call."""
    B, C = scores.shape[:2]
    H, W = size
    step = max(1, max_elements // max(C * H * W, 1))
    return torch.cat([F.interpolate(scores[i:i + step], size=(H, W), mode="bilinear", align_corners=False).argmax(1)
                      for i in range(0, B, step)]) if B else scores.new_zeros((0, H, W), dtype=torch.long)


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_pred: int, n_classes: int) -> np.ndarray:
    """Counts (n_pred, n_classes) of predicted cluster vs ground-truth class; labels outside
    [0, n_classes) are ignored."""
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    valid = (label >= 0) & (label < n_classes)
    idx = pred[valid] * n_classes + label[valid]
    counts = torch.bincount(idx, minlength=n_pred * n_classes)
    return counts.reshape(n_pred, n_classes).cpu().numpy().astype(np.int64)


def hungarian_match(conf: np.ndarray) -> np.ndarray:
    """The one-to-one assignment of clusters to classes maximising matched pixels: array (n_pred,)
    giving each cluster's class, -1 for clusters left unmatched."""
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Class x class confusion (rows: matched prediction, cols: ground truth)."""
    n_classes = conf.shape[1]
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cluster, cls in enumerate(mapping):
        if cls >= 0:
            out[cls] += conf[cluster]
    return out


def segmentation_scores(conf: np.ndarray) -> dict:
    """Hungarian-matched mIoU and pixel accuracy (percent) and per-class IoU from a cluster x class
    confusion matrix. mIoU averages the classes present in the ground truth or the prediction."""
    mapping = hungarian_match(conf)
    matched = matched_confusion(conf, mapping)
    tp = np.diag(matched).astype(np.float64)
    gt = matched.sum(0).astype(np.float64)
    pred = matched.sum(1).astype(np.float64)
    union = gt + pred - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {
        "miou": float(100 * np.nanmean(iou)) if present.any() else 0.0,
        "pixel_accuracy": float(100 * tp.sum() / total) if total else 0.0,
        "per_class_iou": [None if np.isnan(v) else float(100 * v) for v in iou],
        "mapping": mapping,
        "matched_confusion": matched,
    }


def miou_by_kind(per_class_iou, kinds) -> dict:
    """mIoU (percent) over the thing classes and over the stuff classes separately: {'miou_things',
    'miou_stuff'}, each the mean of the classes of that kind with an IoU (present in the ground truth or the
    prediction). `kinds` gives each class's kind ('thing', 'stuff', 'background'); background is in neither.
    Empty when `kinds` is empty (a dataset that does not split its classes into things and stuff)."""
    if not kinds:
        return {}
    if len(kinds) != len(per_class_iou):
        raise ValueError(f"{len(kinds)} class kinds for {len(per_class_iou)} classes")
    out = {}
    for kind, key in (("thing", "miou_things"), ("stuff", "miou_stuff")):
        values = [v for v, k in zip(per_class_iou, kinds) if k == kind and v is not None]
        if values:
            out[key] = float(np.mean(values))
    return out


def foreground_thing_counts(foreground: torch.Tensor, label: torch.Tensor, thing_ids, n_classes: int) -> np.ndarray:
    """How much of an attention foreground is things: counts [thing pixels in the foreground, labelled pixels
    in the foreground, thing pixels, labelled pixels] for a patch-level mask `foreground` (B, h, w) and class
    labels (B, H, W), H and W multiples of h and w; labels outside [0, n_classes) are left out, like in
    `confusion_matrix`."""
    B, h, w = foreground.shape
    H, W = label.shape[1:]
    fg = foreground[:, :, None, :, None].expand(B, h, H // h, w, W // w).reshape(B, H, W)
    label = label.long()
    valid = (label >= 0) & (label < n_classes)
    thing = valid & torch.isin(label, torch.as_tensor(list(thing_ids), dtype=torch.long, device=label.device))
    return np.array([int((thing & fg).sum()), int((valid & fg).sum()), int(thing.sum()), int(valid.sum())],
                    dtype=np.int64)
