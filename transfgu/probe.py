"""Linear probe: a 1x1 classifier on the frozen backbone's patch features, trained with the train split's labels
and scored on val without any matching (the "linear" column of STEGO's and HP's tables; docs/method.md section 6).

The features are the backbone's final patch tokens, L2-normalised (`baselines.patch_tokens`, the same tokens the
patch k-means baseline clusters). The probe's logits are upsampled bilinearly to the label resolution and trained
with cross-entropy over the labelled pixels (labels outside [0, C) are left out), with Adam; at evaluation the
upsampled logits' argmax is the prediction, scored against the labels class for class."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import faults
from .baselines import patch_tokens
from .checkpoint import restart_from_checkpoint, save_on_master
from .metrics import confusion_matrix, upsample_argmax
from .precision import autocast
from .progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """What the training loop reads (from params.yaml's `probe` section, resolved)."""
    epochs: int
    lr: float
    batch_size: int
    seed: int = 0
    forward_batch: int = 128         # images per backbone forward where no gradient step follows (cache, val)
    precision: str = "fp32"          # of the backbone forward; the probe itself runs in float32
    cache_bytes: float = 0           # hold the train features in memory when they take at most this many bytes
    num_workers: int = 0


class NonFiniteProbeLoss(ValueError):
    pass


def features(backbone, images_u8: torch.Tensor, precision: str) -> torch.Tensor:
    """Frozen patch features (B, D, h, w), float32, L2-normalised, of uint8 images (B, 3, H, W)."""
    with autocast(precision, images_u8.device):
        tokens = patch_tokens(backbone, images_u8.float() / 255)
    return tokens.float().permute(0, 3, 1, 2).contiguous()


def build_probe(dim: int, n_classes: int, seed: int) -> torch.nn.Conv2d:
    """The linear probe, a 1x1 convolution (PyTorch's default initialisation from a generator seeded by `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Conv2d(dim, n_classes, kernel_size=1)


def _linear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation from n_in to n_out samples as F.interpolate(mode='linear',
    align_corners=False) does it (each row: the weights of one output sample), read off unit signals."""
    eye = torch.eye(n_in, device=like.device, dtype=like.dtype)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def upsample_bilinear(z: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(z, size, mode='bilinear', align_corners=False) as two matrix products (bilinear interpolation is
    separable): the same values to rounding, and a backward pass that is a matrix product too (PyTorch's
    interpolation backward is several times slower on the CPU)."""
    (h, w), (H, W) = z.shape[-2:], size
    return _linear_weights(h, H, z) @ (z @ _linear_weights(w, W, z).T)


def probe_loss(probe, feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor | None:
    """Cross-entropy of the probe's logits, upsampled bilinearly (align_corners=False) to the labels' size, over
    the pixels labelled in [0, n_classes); None when the batch has no such pixel."""
    logits = upsample_bilinear(probe(feats), labels.shape[-2:])
    valid = (labels >= 0) & (labels < n_classes)
    if not bool(valid.any()):
        return None
    return F.cross_entropy(logits, torch.where(valid, labels, -100), ignore_index=-100)  # mean over valid pixels


def direct_scores(conf: np.ndarray) -> dict:
    """mIoU and pixel accuracy (percent) of a class x class confusion matrix (rows: predicted class, columns:
    ground truth), with no matching: IoU_c = TP_c / (TP_c + FP_c + FN_c) over the classes present in the ground
    truth or the prediction, pixel accuracy = sum_c TP_c / labelled pixels."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {"miou": float(100 * np.nanmean(iou)) if present.any() else 0.0,
            "pixel_accuracy": float(100 * tp.sum() / total) if total else 0.0,
            "per_class_iou": [None if np.isnan(v) else float(100 * v) for v in iou]}


def _loader(dataset, batch_size: int, workers: int, order=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


def feature_bytes(n_images: int, size: int, patch: int, dim: int) -> int:
    """Bytes of the float32 patch features of n_images at size x size (what the in-memory cache holds)."""
    return n_images * (size // patch) ** 2 * dim * 4


class TrainFeatures:
    """The train split as (features, labels) batches in a given order: from memory, after one forward of the whole
    split (when `cached`), or computed again for every batch (one backbone forward of the split per epoch)."""

    def __init__(self, backbone, dataset, settings: ProbeSettings, device, cached: bool):
        self.backbone, self.dataset, self.s, self.device = backbone, dataset, settings, device
        self.feats = self.labels = None
        if cached:
            feats, labels = [], []
            for batch in progress(_loader(dataset, settings.forward_batch, settings.num_workers),
                                  desc="probe features", leave=False):
                feats.append(features(backbone, batch["image"].to(device), settings.precision).cpu())
                labels.append(batch["label"].to(torch.int16))
            self.feats, self.labels = torch.cat(feats), torch.cat(labels)

    def batches(self, order: list[int]):
        B = self.s.batch_size
        if self.feats is not None:
            for i in range(0, len(order), B):
                idx = torch.as_tensor(order[i:i + B])
                yield self.feats[idx].to(self.device), self.labels[idx].to(self.device).long()
            return
        for batch in _loader(self.dataset, B, self.s.num_workers, order):
            yield features(self.backbone, batch["image"].to(self.device), self.s.precision), \
                batch["label"].to(self.device)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The train images' order in an epoch: a permutation seeded by (seed, epoch), the same on every run."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def train_probe(backbone, train_data, n_classes: int, settings: ProbeSettings, device, checkpoint=None,
                key: str | None = None):
    """Train the probe on the train split's labels: returns (probe, history [{epoch, loss}]). With `checkpoint`,
    the state after every epoch is kept there (with `key`) and a run finding it resumes after its last epoch."""
    probe = build_probe(backbone.embed_dim, n_classes, settings.seed).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    run = {"epoch": 0, "history": [], "key": key}
    if checkpoint is not None and restart_from_checkpoint(checkpoint, run, key=key, probe=probe,
                                                          optimizer=optimizer):
        log.info("resuming from %s: %d of %d epochs done", checkpoint, run["epoch"], settings.epochs)
    if run["epoch"] >= settings.epochs:
        return probe, run["history"]
    size = int(train_data.size)
    need = feature_bytes(len(train_data), size, backbone.patch_size, backbone.embed_dim)
    cached = need <= settings.cache_bytes
    log.info("train features (%d images, %.2f GB in float32): %s", len(train_data), need / 1e9,
             "computed once and held in memory" if cached else
             "computed again every epoch (more than probe.cache_gb)")
    source = TrainFeatures(backbone, train_data, settings, device, cached)
    start = run["epoch"]
    for epoch in range(start, settings.epochs):
        total, count = 0.0, 0
        for feats, labels in progress(source.batches(epoch_order(len(train_data), settings.seed, epoch)),
                                      desc=f"probe epoch {epoch + 1}/{settings.epochs}", leave=False):
            loss = probe_loss(probe, feats, labels, n_classes)
            if loss is None:
                continue
            if not math.isfinite(loss.item()):
                raise NonFiniteProbeLoss(f"probe: the loss is {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        run["history"].append({"epoch": epoch, "loss": total / max(count, 1)})
        log.info("probe epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, run["history"][-1]["loss"])
        run["epoch"] = epoch + 1
        if checkpoint is not None:
            save_on_master(checkpoint, run, on_written=lambda: faults.reached("probe", epoch + 1 - start, True),
                           probe=probe, optimizer=optimizer)
            faults.reached("probe", epoch + 1 - start)
    return probe, run["history"]


@torch.no_grad()
def probe_confusion(backbone, probe, dataset, n_classes: int, settings: ProbeSettings, device) -> np.ndarray:
    """Class x class confusion (rows: predicted, columns: ground truth) of the probe on a labelled split: logits
    upsampled bilinearly to the labels' size, argmax; labels outside [0, n_classes) left out."""
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for batch in progress(_loader(dataset, settings.forward_batch, settings.num_workers), desc="probe val",
                          leave=False):
        label = batch["label"].to(device)
        pred = upsample_argmax(probe(features(backbone, batch["image"].to(device), settings.precision)),
                               label.shape[-2:])
        conf += confusion_matrix(pred, label, n_classes, n_classes)
    return conf


def remove_checkpoint(path: str | Path) -> None:
    """Once probe_metrics.json is written (fault point `probe:end` before)."""
    faults.reached("probe", "end")
    Path(path).unlink(missing_ok=True)
