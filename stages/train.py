"""train: the Segmenter decoder on the frozen backbone with the pseudo masks and bootstrapping
(docs/method.md section 4).

After every epoch the whole training state is kept in a checkpoint next to the outputs,
outputs/.decoder.pt.checkpoint-<key> (outside DVC's outs; key: the fingerprint of the params, inputs and code,
common.run_key); a re-run after an interruption resumes at the next epoch, and the checkpoint is removed once
decoder.pt and train_log.csv are written (README, "Interrupted runs"). A NaN or infinite loss stops the run
with a one-line error naming the epoch and the step.
While it trains, dvclive keeps outputs/dvclive/ up to date (rank 0): metrics.json (the last finished epoch, its
val scores, the latest training loss: a DVC metric, so `dvc exp show` follows the run) and plots/metrics/*.tsv
(`dvc plots show` draws them); without dvclive installed the stage warns once and trains without them.
train_log.csv holds every epoch's row when the stage ends."""
import csv
import os

import numpy as np
import torch

from torch.distributed.elastic.multiprocessing.errors import record

from common import DECODER, INDEX, PSEUDO_MASKS, TRAIN_LIVE, TRAIN_LOG, log, run_key, setup, stage_main, task_of, timed
from runtime import backbone_of, decode_of, device, precision_of, workers_of

from transfgu import dist
from transfgu.data.dataset import SplitDataset
from transfgu.data.index import split_is_labelled
from transfgu.data.loaders import my_loader
from transfgu.dist import GlobalBatchSampler
from transfgu.io import atomic_output, read_json
from transfgu.models.decoder import build_decoder
from transfgu.pieces import keyed_path
from transfgu.pseudo_store import PseudoMaskReader, check_pseudo_masks
from transfgu.train import NonFiniteLoss, TrainConfig, remove_checkpoint, train_decoder

LOG_FIELDS = ("epoch", "loss", "loss_cat", "loss_uncertainty", "loss_cls_emb", "val_miou", "val_pixel_accuracy",
              "bootstrapping", "handover", "seconds")
POINTS_PER_EPOCH = 10  # training-loss points per epoch in dvclive's step curve


def open_live(directory):
    """A dvclive logger writing to `directory` that leaves dvc.yaml alone (it declares dvclive's files) and saves no
    experiment of its own. Under `dvc repro` / `dvc exp run` (DVC_ROOT set) it joins the run as dvclive does
    (e.g. for DVC Studio's live updates); otherwise, or where that fails (a git repository without a commit yet),
    it writes plain files without looking at the repository (dvclive would `dvc init` a bare git repository).
    None, with one warning, when dvclive is not installed: the stage then trains without the live log."""
    try:
        from dvclive import Live
    except ImportError as e:
        log.warning("dvclive is not installed (%s): training without the live log in %s; %s is still written", e,
                    directory, TRAIN_LOG)
        return None

    class PlainLive(Live):
        def _init_dvc(self):  # no repository lookup
            pass

    if os.environ.get("DVC_ROOT"):
        try:
            return Live(str(directory), dvcyaml=None, save_dvc_exp=False)
        except Exception as e:  # noqa: BLE001 -- scmrepo's errors are not dvclive's (e.g. "Empty git repo")
            log.info("dvclive without the repository (%s: %s)", type(e).__name__, e)
    return PlainLive(str(directory), dvcyaml=None, save_dvc_exp=False)


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
        self.live.sync()

    def end(self):
        if self.live is not None:
            self.live.end()


@record
@stage_main
def main():
    params = setup("train")
    task, cfg, R, seed = task_of(params), params["train"], int(params["dataset"]["R"]), int(params["seed"])
    dev = device()
    backbone = backbone_of(params, dev)
    index = read_json(INDEX)
    check_pseudo_masks(PSEUDO_MASKS, task.n_concepts, task.granularity)  # BadInput: one line (stage_main)
    train_data = SplitDataset(index, "train", R, maps=PseudoMaskReader(PSEUDO_MASKS), decode=decode_of(params, "train"),
                              param="train.decode")
    val_loader = None
    if cfg["select_by"] not in ("val", "last"):
        raise SystemExit(f"train.select_by: expected 'val' or 'last', got {cfg['select_by']!r}")
    labelled = split_is_labelled(index, "val", task)
    if cfg["select_by"] == "val" and not labelled:
        log.warning("train.select_by is 'val' but the val split has no labels: keeping the last epoch")
    elif cfg["select_by"] == "val":
        _, val_loader = my_loader(SplitDataset(index, "val", R, lut=task.label_lut),
                                  int(cfg["batch_size"]), workers_of(params, "train"))
    decoder = build_decoder(task.n_outputs, backbone.embed_dim, seed, float(cfg["dropout"]))
    tc = TrainConfig(epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                     weight_decay=float(cfg["weight_decay"]), loss_weights=tuple(cfg["loss_weights"]),
                     bootstrap_start=int(cfg["bootstrap_start"]),
                     bootstrap_intervals=tuple(cfg["bootstrap_intervals"]),
                     bootstrap_block=int(cfg["bootstrap_block"]), seed=seed,
                     precision=precision_of(params, "train", dev))
    log.info("%d train images at %d px (crops to %d), %d output channels, %d epochs, batch %d (%d per process x "
             "%d), %s, %s", len(train_data), R, R // 2, task.n_outputs, tc.epochs, tc.batch_size,
             tc.batch_size // dist.world_size(), dist.world_size(), tc.precision,
             "model kept by val mIoU + accuracy" if val_loader is not None else "last epoch kept")
    sampler = GlobalBatchSampler(len(train_data), tc.batch_size, seed)
    workers = workers_of(params, "train")
    train_loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, num_workers=workers,
                                               pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                               collate_fn=train_data.collate)
    checkpoint = keyed_path(DECODER, "checkpoint", run_key("train", params, [INDEX, PSEUDO_MASKS],
                                                           precision=tc.precision, device=dev.type))
    live = LiveLog(TRAIN_LIVE, len(sampler)) if dist.is_main() else None
    with timed("train"):
        try:
            best, history = train_decoder(backbone, decoder, train_loader, val_loader, tc, task.things_only,
                                          len(task.class_names), dev, on_epoch=live and live.on_epoch,
                                          on_step=live and live.on_step, checkpoint=checkpoint)
        except NonFiniteLoss as e:
            raise SystemExit(str(e)) from None  # one line, exit status 2 (stage_main)
    if dist.is_main():
        live.end()
        with atomic_output(DECODER) as tmp:
            torch.save(best, tmp)
        with atomic_output(TRAIN_LOG) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
        remove_checkpoint(checkpoint)
        log.info("wrote %s, %s%s", DECODER, TRAIN_LOG, f" and {TRAIN_LIVE}" if live.live is not None else "")
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
