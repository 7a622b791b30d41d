"""What the train stage shows while it runs and keeps when it ends: dvclive's live metrics and curves
(outputs/dvclive/, `LiveLog`) and the per-epoch table (outputs/train_log.csv, `write_train_log`)."""
from __future__ import annotations

import csv
import logging
import os

import numpy as np

from .io import atomic_output

log = logging.getLogger("transfgu")
LOG_FIELDS = ("epoch", "loss", "loss_cat", "loss_uncertainty", "loss_cls_emb", "val_miou", "val_pixel_accuracy",
              "val_miou_things", "val_miou_stuff", "val_things_predicted", "bootstrapping", "handover", "seconds")
POINTS_PER_EPOCH = 10  # training-loss points per epoch in dvclive's step curve


def open_live(directory):
    """A dvclive logger writing to `directory` that leaves dvc.yaml alone (it declares dvclive's files) and saves no
    experiment of its own; it joins `dvc repro` / `dvc exp run` as dvclive does (e.g. for DVC Studio's live
    updates). None, with one line, where it cannot serve: dvclive is not installed (a warning: the stage then
    trains without the live log), the stage runs by hand outside a DVC project (dvclive would `dvc init` the
    git repository it finds), or the repository cannot be followed (a git repository without a commit)."""
    try:
        from dvclive import Live
    except ImportError as e:
        log.warning("dvclive is not installed (%s): training without the live log in %s; train_log.csv is still "
                    "written", e, directory)
        return None
    if not os.environ.get("DVC_ROOT"):
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
        try:
            Repo.find_root()
        except NotDvcRepoError:
            log.info("not inside a DVC project: no live log in %s (train_log.csv is still written)", directory)
            return None
    try:
        return Live(str(directory), dvcyaml=None, save_dvc_exp=False)
    except Exception as e:  # noqa: BLE001 -- scmrepo's errors are not dvclive's (e.g. "Empty git repo")
        log.warning("dvclive cannot follow this run (%s: %s; a git repository needs a first commit): no live log "
                    "in %s; train_log.csv is still written", type(e).__name__, e, directory)
        return None


class LiveLog:
    """train_decoder's callbacks -> dvclive (rank 0 only). Step = optimisation steps done. Every ~1/10 epoch:
    train/loss, the mean loss of the steps since the last point; after each epoch: epoch (counted from 0, as in
    train_log.csv) and val/miou, val/pixel_accuracy when the stage validates. Each point rewrites the summary
    (metrics.json) and appends to the plots' TSV files. Without dvclive (open_live gives None) it does nothing."""

    def __init__(self, directory, steps_per_epoch: int):
        self.live = open_live(directory)
        self.every, self.steps_per_epoch = max(1, steps_per_epoch // POINTS_PER_EPOCH), steps_per_epoch
        self.steps, self.window = 0, []

    def _flush(self):
        if self.window:
            self.live.step = self.steps
            self.live.log_metric("train/loss", float(np.mean(self.window)))
            self.window = []

    def on_step(self, epoch: int, losses: dict):
        if self.live is None:
            return
        self.steps += 1
        self.window.append(losses["loss"])
        if len(self.window) >= self.every:
            self._flush()
            self.live.sync()

    def on_epoch(self, row: dict):
        if self.live is None:
            return
        self._flush()
        self.steps = (int(row["epoch"]) + 1) * self.steps_per_epoch  # also for the rows a resumed run replays
        self.live.step = self.steps
        self.live.log_metric("epoch", int(row["epoch"]), plot=False)
        if "val_miou" in row:
            self.live.log_metric("val/miou", float(row["val_miou"]))
            self.live.log_metric("val/pixel_accuracy", float(row["val_pixel_accuracy"]))
        for key in ("val_miou_things", "val_miou_stuff", "val_things_predicted"):  # datasets with things and stuff
            if key in row:
                self.live.log_metric(key.replace("val_", "val/", 1), float(row[key]))
        self.live.sync()

    def end(self):
        if self.live is not None:
            self.live.end()


def write_train_log(path, history) -> None:
    """train_log.csv: one row per epoch (LOG_FIELDS)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
