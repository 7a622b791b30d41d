"""probe: the linear probe of STEGO's and HP's tables (docs/method.md section 6). A 1x1 classifier on the frozen
backbone's patch features is trained with the train split's labels and scored on val without matching:
outputs/probe_metrics.json holds linear_miou and linear_pixel_accuracy (a DVC metric), outputs/probe.pt the trained
layer (a cached out: a run with the same inputs comes back from DVC's run cache).

It reads the backbone, the split index and its own params (with granularity, which fixes the label set), nothing
of the TransFGU stages: changing train.* does not re-run it. A split without labels, or probe.enabled false, gives
one log line, an empty probe_metrics.json and a probe.pt without weights; the rest of the DAG runs. After every epoch the probe's state is kept
in outputs/.probe_metrics.json.checkpoint-<key>; a re-run after an interruption resumes at the next epoch. One
process (under launcher.nproc_per_node > 1 it still runs alone)."""
from transfgu.data.dataset import SplitDataset
from transfgu.data.index import split_is_labelled
from transfgu.errors import InputValueError
from transfgu.io import atomic_output, write_json
from transfgu.pieces import keyed_path
from transfgu.probe import (NonFiniteProbeLoss, ProbeSettings, direct_scores, probe_confusion, remove_checkpoint,
                            train_probe)
from transfgu.stage import log, run_stage


def save_probe(path, task, probe=None, why: str = "") -> None:
    """probe.pt: the 1x1 layer's state dict with the class names it predicts (None and the reason without a probe)."""
    import torch
    with atomic_output(path) as tmp:
        torch.save({"state_dict": None if probe is None else probe.state_dict(), "classes": list(task.class_names),
                    "why_none": why}, tmp)


def main(stage):
    p, cfg, task, R = stage.params, stage.config, stage.params.task, stage.params.dataset.R
    out = stage.out("probe_metrics.json")
    if not cfg.enabled:
        log.info("probe.enabled is false: no linear probe; %s holds no probe numbers", out)
        write_json(out, {})
        save_probe(stage.out("probe.pt"), task, why="probe.enabled is false")
        return
    index = stage.index
    unlabelled = [s for s in ("train", "val") if not split_is_labelled(index, s, task)]
    if unlabelled:
        log.warning("no linear probe: the %s split%s no labels (dataset '%s'); %s holds no probe numbers",
                    " and ".join(unlabelled), "s have" if len(unlabelled) > 1 else " has", p.dataset.name, out)
        write_json(out, {})
        save_probe(stage.out("probe.pt"), task, why=f"no labels in the {' and '.join(unlabelled)} split")
        return
    backbone, precision = stage.backbone(), stage.precision()
    backbone.eval()
    settings = ProbeSettings(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=p.seed,
                             forward_batch=cfg.forward_batch, precision=precision, cache_bytes=cfg.cache_gb * 1e9, num_workers=stage.workers())
    train = SplitDataset(index, "train", R, lut=task.label_lut, root=p.dataset.root)
    val = SplitDataset(index, "val", R, lut=task.label_lut, root=p.dataset.root)
    n_classes = len(task.class_names)
    log.info("linear probe: %d classes, %d train / %d val images at %d px, %d epochs, batch %d, lr %g, %s",
             n_classes, len(train), len(val), R, cfg.epochs, cfg.batch_size, cfg.lr, precision)
    key = stage.run_key([stage.dep("index.json")], precision=precision, device=stage.device.type)
    checkpoint = keyed_path(out, "checkpoint", key)
    with stage.timed():
        try:
            probe, _ = train_probe(backbone, train, n_classes, settings, stage.device, checkpoint, key)
        except NonFiniteProbeLoss as e:
            raise InputValueError(f"{e} (probe.lr, probe.precision)") from None
        probe.eval()
        s = direct_scores(probe_confusion(backbone, probe, val, n_classes, settings, stage.device))
    save_probe(stage.out("probe.pt"), task, probe)
    write_json(out, {"linear_miou": s["miou"], "linear_pixel_accuracy": s["pixel_accuracy"]})
    remove_checkpoint(checkpoint)
    log.info("linear probe on val: miou %.2f, pixel accuracy %.2f; wrote %s", s["miou"], s["pixel_accuracy"], out)


if __name__ == "__main__":
    run_stage("probe", main, keeps="finished epochs")
