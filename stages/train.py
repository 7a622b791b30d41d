"""train: the Segmenter decoder on the frozen backbone with the pseudo masks and bootstrapping
(docs/method.md section 4).

After every epoch the whole training state is kept in a checkpoint next to the outputs,
outputs/.decoder.pt.checkpoint-<key> (outside DVC's outs; key: the fingerprint of the params, inputs and code);
a re-run after an interruption resumes at the next epoch, and the checkpoint is removed once decoder.pt and
train_log.csv are written (docs/usage.md, "Interrupted runs"). A NaN or infinite loss stops the run with a
one-line error naming the epoch and the step. While it trains, dvclive keeps outputs/dvclive/ up to date
(transfgu/live.py)."""
import torch

from transfgu import dist
from transfgu.data.dataset import SplitDataset
from transfgu.data.index import split_is_labelled
from transfgu.data.loaders import my_loader
from transfgu.dist import GlobalBatchSampler
from transfgu.errors import InputValueError
from transfgu.io import atomic_output
from transfgu.live import LiveLog, write_train_log
from transfgu.models.decoder import build_decoder
from transfgu.pieces import keyed_path
from transfgu.pseudo_store import PseudoMaskReader, check_pseudo_masks
from transfgu.stage import log, run_stage
from transfgu.train import NonFiniteLoss, TrainConfig, remove_checkpoint, train_decoder


def main(stage):
    p, cfg, dev = stage.params, stage.config, stage.device
    task, R, index, masks = p.task, p.dataset.R, stage.index, stage.dep("pseudo_masks.h5")
    backbone = stage.backbone()
    check_pseudo_masks(masks, task.n_concepts, task.granularity)
    train_data = SplitDataset(index, "train", R, maps=PseudoMaskReader(masks), decode=cfg.decode,
                              root=p.dataset.root)
    val_loader = None
    labelled = split_is_labelled(index, "val", task)
    if cfg.select_by == "val" and not labelled:
        log.warning("train.select_by is 'val' but the val split has no labels: keeping the last epoch")
    elif cfg.select_by == "val":
        val_data = SplitDataset(index, "val", R, lut=task.label_lut, root=p.dataset.root)
        _, val_loader = my_loader(val_data, cfg.batch_size, stage.workers())
    decoder = build_decoder(task.n_outputs, backbone.embed_dim, p.seed, cfg.dropout)
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     loss_weights=tuple(cfg.loss_weights), bootstrap_start=cfg.bootstrap_start,
                     bootstrap_intervals=tuple(cfg.bootstrap_intervals), bootstrap_block=cfg.bootstrap_block,
                     seed=p.seed, precision=stage.precision())
    sampler = GlobalBatchSampler(len(train_data), tc.batch_size, p.seed)
    log.info("%d train images at %d px (crops to %d), %d output channels, %d epochs of %d steps, batch %d (%d per "
             "process x %d), %s, %s", len(train_data), R, R // 2, task.n_outputs, tc.epochs, len(sampler),
             tc.batch_size, tc.batch_size // dist.world_size(), dist.world_size(), tc.precision,
             "model kept by val mIoU + accuracy" if val_loader is not None else "last epoch kept")
    if len(sampler) * tc.epochs < 100:
        log.warning("only %d optimisation steps in all (%d train images, train.batch_size %d, train.epochs %d): "
                    "the decoder will barely train; use a smaller batch or more epochs", len(sampler) * tc.epochs,
                    len(train_data), tc.batch_size, tc.epochs)
    workers = stage.workers()
    train_loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, num_workers=workers,
                                               pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                               collate_fn=train_data.collate)
    decoder_path, log_path = stage.out("decoder.pt"), stage.out("train_log.csv")
    checkpoint = keyed_path(decoder_path, "checkpoint", stage.run_key([stage.dep("index.json"), masks],
                                                                      precision=tc.precision, device=dev.type))
    live = LiveLog(stage.out("dvclive"), len(sampler)) if dist.is_main() else None
    with stage.timed():
        try:
            best, history = train_decoder(backbone, decoder, train_loader, val_loader, tc, task.things_only,
                                          len(task.class_names), dev, on_epoch=live and live.on_epoch,
                                          on_step=live and live.on_step, checkpoint=checkpoint,
                                          class_kinds=task.class_kinds)
        except NonFiniteLoss as e:
            raise InputValueError(f"{e} (train.lr, train.precision)") from None
    if dist.is_main():
        live.end()
        stage.out("dvclive").mkdir(parents=True, exist_ok=True)  # a declared out, also when there was no live log
        with atomic_output(decoder_path) as tmp:
            torch.save(best, tmp)
        write_train_log(log_path, history)
        remove_checkpoint(checkpoint)
        log.info("wrote %s, %s%s", decoder_path, log_path, f" and {live.live.dir}" if live.live is not None else "")


if __name__ == "__main__":
    run_stage("train", main, distributed=True, keeps="finished epochs")
