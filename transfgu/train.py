"""Segmenter training with bootstrapping (docs/method.md section 4). Inference lives in segmenter.py."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dist, faults
from .augment import augment, draw_params
from .checkpoint import restart_from_checkpoint, restore_rng, save_on_master
from .data.dataset import images_on
from .devices import to_device
from .losses import loss_cat, loss_cls_emb, loss_uncertainty, normalize_maps, soft_targets
from .metrics import miou_by_kind, segmentation_scores
from .optim import decay_groups
from .precision import autocast
from .progress import progress
from .pseudo import maps_on
from .segmenter import Segmenter, encode

log = logging.getLogger(__name__)

ALPHAS = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)


@dataclass
class EpochPlan:
    bootstrapping: bool   # a teacher predicts this epoch
    handover: bool        # at the start of this epoch the teacher takes the student, the student is reset
    alpha: float          # weight of the negative-label term (0 without bootstrapping)


def bootstrap_schedule(epochs: int, start: int, intervals=(3, 3, 3, 2), block: int = 10,
                       alphas=ALPHAS) -> list[EpochPlan]:
    """Per epoch: bootstrapping from epoch `start`; a hand-over at every epoch e >= start with
    e % u == 0, u = intervals[min(e // block, len - 1)], and at `start` itself if that is not such an
    epoch (so the teacher is never the untrained decoder); alpha = alphas[epochs since the last hand-over]."""
    plans, since, handed = [], 0, False
    for e in range(epochs):
        u = intervals[min(e // block, len(intervals) - 1)]
        boot = e >= start
        handover = boot and (e % u == 0 or not handed)
        handed |= handover
        since = 0 if handover else since + 1
        plans.append(EpochPlan(boot, handover, alphas[min(since, len(alphas) - 1)] if boot else 0.0))
    return plans


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 5e-4
    loss_weights: tuple = (1.0, 0.3, 1.0)
    bootstrap_start: int = 3
    bootstrap_intervals: tuple = (3, 3, 3, 2)
    bootstrap_block: int = 10
    teacher_weight: float = 0.5
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"   # 'bf16': backbone, teacher and student forwards in bf16 autocast


def features_and_teacher(backbone, images_01: torch.Tensor, teacher=None, grid=None, precision: str = "fp32"):
    """Frozen patch tokens of a batch, computed once, and the teacher's float32 logits on them (None
    without a teacher). With precision 'bf16' the tokens are bf16."""
    patches = encode(backbone, images_01, precision)
    if teacher is None:
        return patches, None
    with torch.no_grad(), autocast(precision, images_01.device):
        return patches, teacher(patches, grid)[0].float()


def decoder_step(student, optimizer, patches, maps, teacher_logits, cfg, things_only: bool, alpha: float = 0.0,
                 permutation=None):
    """One optimisation step of the decoder on given patch tokens; returns (loss, loss_cat,
    loss_uncertainty, loss_cls_emb)."""
    with autocast(cfg.precision, patches.device):
        logits, class_feat = student(patches, maps.shape[-2:])
    logits, class_feat = logits.float(), class_feat.float()  # losses in float32
    target = soft_targets(maps, things_only, teacher_logits, cfg.teacher_weight)
    l_cat = loss_cat(logits, target, alpha, permutation)
    if things_only:
        l_unc = loss_uncertainty(logits[:, 1:], (normalize_maps(maps) > 0.1).any(1))
    else:
        l_unc = loss_uncertainty(logits)
    l_emb = loss_cls_emb(class_feat)
    w_cat, w_unc, w_emb = cfg.loss_weights
    loss = w_cat * l_cat + w_unc * l_unc + w_emb * l_emb
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    optimizer.step()
    return loss.detach(), l_cat.detach(), l_unc.detach(), l_emb.detach()


def train_step(backbone, student, teacher, optimizer, images, maps, cfg, things_only: bool, alpha: float = 0.0,
               permutation=None):
    """Augmented images (B, 3, r, r) and maps (B, K, h, h) -> one step; the frozen encoder's features are
    computed once and shared by the student and the teacher (None: no bootstrapping)."""
    patches, teacher_logits = features_and_teacher(backbone, images, teacher, maps.shape[-2:], cfg.precision)
    return decoder_step(student, optimizer, patches, maps, teacher_logits, cfg, things_only, alpha, permutation)


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite training loss: training stops at once (the last epoch's checkpoint is kept)."""


def remove_checkpoint(path: str | Path) -> None:
    """Once the results are written: the checkpoint is removed (fault point `train:end` before)."""
    faults.reached("train", "end")
    Path(path).unlink(missing_ok=True)


def format_epoch(row: dict, epochs: int | None = None) -> str:
    """One readable log line for a history row: 'epoch 3 (4/12): loss 2.4824 (cat 1.4047, ...); val miou 15.46, ...'
    (epochs counted from 0, as in the history)."""
    head = f"epoch {row['epoch']}" + (f" ({row['epoch'] + 1}/{epochs})" if epochs else "")
    parts = [f"loss {row['loss']:.4f} (cat {row['loss_cat']:.4f}, uncertainty {row['loss_uncertainty']:.4f}, "
             f"cls_emb {row['loss_cls_emb']:.4f})"]
    if "val_miou" in row:
        parts.append(f"val miou {row['val_miou']:.2f}, pixel accuracy {row['val_pixel_accuracy']:.2f}")
        if "val_miou_things" in row:
            parts[-1] += f" (things {row['val_miou_things']:.2f}, stuff {row.get('val_miou_stuff', 0.0):.2f}, " \
                f"{row.get('val_things_predicted', 0.0):.1f} % of pixels predicted as things)"
    if row.get("bootstrapping"):
        parts.append("bootstrapping" + (", teacher hand-over" if row.get("handover") else ""))
    if "seconds" in row:
        parts.append(f"{row['seconds']:.1f} s")
    return f"{head}: " + "; ".join(parts)


def train_one_epoch(backbone, student, teacher, optimizer, train_loader, cfg: TrainConfig, things_only: bool,
                    epoch: int, plan: EpochPlan, perm_gen: torch.Generator, device, on_step=None,
                    kept: str = "no checkpoint kept") -> dict:
    """One epoch of decoder steps (the teacher predicts when plan.bootstrapping); returns its history row without
    validation: the losses averaged over the steps and the ranks, bootstrapping, handover. A NaN or infinite loss
    raises NonFiniteLoss naming the epoch, the step and `kept` (what the checkpoint keeps)."""
    p = backbone.patch_size
    student.train()
    if hasattr(getattr(train_loader, "batch_sampler", None), "set_epoch"):
        train_loader.batch_sampler.set_epoch(epoch)
    sums = {"loss": 0.0, "loss_cat": 0.0, "loss_uncertainty": 0.0, "loss_cls_emb": 0.0}
    n_batches = 0
    for batch in progress(train_loader, desc=f"train epoch {epoch}", leave=False):
        images = images_on(batch, device).float() / 255
        maps = maps_on(batch["maps"], device)
        R = images.shape[-1]
        params = draw_params(cfg.seed, epoch, batch["index"].tolist(), R)
        images, maps = augment(images, maps, params, R // 2, R // (2 * p))
        perm = to_device(torch.randperm(maps.shape[1] + int(things_only), generator=perm_gen), device) \
            if plan.bootstrapping else None
        losses = train_step(backbone, student, teacher if plan.bootstrapping else None, optimizer, images, maps,
                            cfg, things_only, plan.alpha, perm)
        values = [v.item() for v in losses]
        if not math.isfinite(values[0]):
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {n_batches}: " + ", ".join(
                f"{k} {v}" for k, v in zip(sums, values)) + f"; training stopped, {kept}")
        for k, v in zip(sums, values):
            sums[k] += v
        n_batches += 1
        if on_step is not None:
            on_step(epoch, {k: v.item() for k, v in zip(sums, losses)})
    means = dist.all_sum(np.array(list(sums.values()), dtype=np.float64)) / dist.world_size()
    return {"epoch": epoch, **{k: v / max(n_batches, 1) for k, v in zip(sums, means.tolist())},
            "bootstrapping": plan.bootstrapping, "handover": plan.handover}


def evaluate(backbone, decoder, val_loader, n_classes: int, device, precision: str = "fp32", class_kinds=()) -> dict:
    """The decoder's val scores over all ranks: {'val_miou', 'val_pixel_accuracy'} (leaves it in eval mode); where
    `class_kinds` says which classes are things: also 'val_miou_things', 'val_miou_stuff' and 'val_things_predicted',
    the percentage of the labelled val pixels predicted as a thing class (after the matching)."""
    conf = dist.all_sum(Segmenter(backbone, decoder).confusion(val_loader, n_classes, device, "val",
                                                               precision=precision))
    s = segmentation_scores(conf)
    row = {"val_miou": s["miou"], "val_pixel_accuracy": s["pixel_accuracy"]}
    row.update({f"val_{k}": v for k, v in miou_by_kind(s["per_class_iou"], class_kinds).items()})
    things = [c for c, kind in enumerate(class_kinds) if kind == "thing"]
    if things:
        row["val_things_predicted"] = 100 * float(s["matched_confusion"][things].sum()) / max(int(conf.sum()), 1)
    return row


def wrap_ddp(decoder, device):
    """The decoder as trained: under several processes a DistributedDataParallel (gradients averaged over ranks;
    every rank holds the same weights), else itself."""
    if dist.world_size() == 1:
        return decoder
    return torch.nn.parallel.DistributedDataParallel(
        decoder, device_ids=[device] if torch.device(device).type == "cuda" else None)


def resume_decoder(checkpoint, run: dict, epochs: int, device, on_epoch=None, **objects) -> None:
    """Resume from `checkpoint` when it exists: the objects' states and `run`'s values (restart_from_checkpoint),
    the initial and best weights moved to `device`; on_epoch sees the rows of the epochs done before."""
    if checkpoint is None or not restart_from_checkpoint(checkpoint, run, **objects):
        return
    for sd in (run["init"], run["best"]):  # moved in place: the same OrderedDict (with its _metadata) is saved
        for k, v in sd.items():
            sd[k] = v.to(device)
    log.info("resuming from %s: epochs 0-%d done, %d to go", checkpoint, run["epoch"], epochs - run["epoch"] - 1)
    if on_epoch is not None:
        for row in run["history"]:  # the log of the epochs done before (their per-step losses are not kept)
            on_epoch(row)


def train_decoder(backbone, decoder, train_loader, val_loader, cfg: TrainConfig, things_only: bool,
                  n_classes: int, device, on_epoch=None, on_step=None, checkpoint: str | Path | None = None,
                  class_kinds=()):
    """Train `decoder` on the frozen `backbone`. Returns (best state dict, history list).

    The best epoch is chosen by mIoU + pixel accuracy on val_loader when given, else the last epoch is
    kept (`class_kinds`: each class's kind, for the per-epoch thing and stuff scores). The backbone features of each augmented batch are computed once and shared by the student
    and the teacher. on_epoch(row) sees each epoch's history row as it is done (on a resumed run, first the rows
    of the epochs done before); on_step(epoch, losses) each step's losses ({'loss', 'loss_cat',
    'loss_uncertainty', 'loss_cls_emb'}, this process's batch).

    checkpoint: a file where the whole state is kept after every epoch (rank 0 writes it atomically, every rank
    reads it; transfgu.checkpoint): student, teacher, initial weights (for the resets), optimizer, every random
    generator (each rank's torch / CUDA / numpy / python ones, the concept permutation generator), history and the
    best state so far. When it exists, training resumes at the next epoch and ends with the same weights and
    history as an uninterrupted run (on the CPU, with the same number of processes: with another number, rank r
    takes the random state of rank r % the old number and a warning says so). The caller removes it once the
    results are written (`remove_checkpoint`). A NaN or infinite loss raises NonFiniteLoss at once, naming the
    epoch and the step; the checkpoint keeps the last good epoch."""
    decoder.to(device)
    run = {"epoch": -1, "init": copy.deepcopy(decoder.state_dict()), "history": [], "best": None,
           "best_score": -np.inf, "rng": None}
    teacher = copy.deepcopy(decoder).eval()
    optimizer = torch.optim.Adam(decay_groups(decoder.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    objects = {"student": decoder, "teacher": teacher, "optimizer": optimizer,
               "perm_gen": torch.Generator().manual_seed(cfg.seed)}
    plans = bootstrap_schedule(cfg.epochs, cfg.bootstrap_start, cfg.bootstrap_intervals, cfg.bootstrap_block)
    resume_decoder(checkpoint, run, cfg.epochs, device, on_epoch, **objects)
    student, start = wrap_ddp(decoder, device), run["epoch"] + 1
    if run["rng"] is not None:
        restore_rng(run["rng"])
    for epoch in range(start, cfg.epochs):
        t0, plan = time.time(), plans[epoch]
        if plan.handover:
            teacher.load_state_dict(decoder.state_dict())
            decoder.load_state_dict(run["init"])
        kept = f"{checkpoint} keeps epoch {epoch - 1}" if checkpoint is not None and epoch > 0 else \
            "no checkpoint kept"
        row = train_one_epoch(backbone, student, teacher, optimizer, train_loader, cfg, things_only, epoch, plan,
                              objects["perm_gen"], device, on_step, kept)
        score = float(epoch)
        if val_loader is not None:
            row.update(evaluate(backbone, decoder, val_loader, n_classes, device, cfg.precision, class_kinds))
            score = row["val_miou"] + row["val_pixel_accuracy"]
        row["seconds"] = time.time() - t0
        run["history"].append(row)
        log.info("%s", format_epoch(row, cfg.epochs))
        if score > run["best_score"]:
            run["best_score"], run["best"] = score, copy.deepcopy(decoder.state_dict())
        if checkpoint is not None:  # the random states after the epoch's last draw (validation included)
            save_on_master(checkpoint, {**{k: run[k] for k in ("init", "history", "best", "best_score")},
                                        "epoch": epoch, "sampler_epoch": epoch},
                           on_written=lambda: faults.reached("train", epoch + 1 - start, partial=True), **objects)
            faults.reached("train", epoch + 1 - start)
        if on_epoch is not None:
            on_epoch(row)
    return run["best"], run["history"]
