"""pseudo: gradient-weighted attention pseudo masks of the train split (docs/method.md section 3), and their
own quality against the ground truth where the split has labels.

Every batch's maps, with its counts for the metrics (confusion matrix, stored-label agreement, attention
foreground), are kept in a piece (transfgu/pieces.py) as soon as they are computed; under torchrun each rank
takes every world-th batch still to do; rank 0 assembles the pieces in batch order (the same file whatever the
number of processes) and sums their counts. A re-run after an interruption computes only the batches without
a piece (docs/usage.md, "Interrupted runs").

With pseudo.oracle the maps are the train split's ground truth in the same layout (transfgu/oracle.py): a
diagnostic of what train and evaluate reach from perfect pseudo labels; no backbone runs."""
import numpy as np
import torch

from transfgu import dist, pseudo_store
from transfgu.centroids import read_centroids
from transfgu.crops import attention_foreground
from transfgu.data.dataset import SplitDataset, images_on
from transfgu.data.index import split_is_labelled
from transfgu.data.tasks import published_pseudo_batch
from transfgu.io import size_mb, write_json
from transfgu.losses import soft_targets
from transfgu.errors import InputValueError
from transfgu.metrics import (confusion_matrix, foreground_thing_counts, miou_by_kind, segmentation_scores,
                              upsample_argmax)
from transfgu.oracle import class_to_concept, oracle_mask_parts
from transfgu.pseudo import assemble_pseudo_masks, pseudo_mask_parts
from transfgu.stage import log, run_stage


def batch_counts(a, q, q16, label, task, thing_ids, R):
    """One batch's counts for the metrics, kept with its maps: labels equal after float16 storage; where the split
    has labels, the confusion of the pseudo labels and the thing pixels in the attention foreground."""
    n_classes = len(task.class_names)
    targets = soft_targets(assemble_pseudo_masks(a, q), task.things_only)
    labels = targets.argmax(1)
    stored16 = soft_targets(assemble_pseudo_masks(a, q16), task.things_only).argmax(1)
    counts = {"agree": np.array([[int((stored16 == labels).sum()), labels.numel()]], dtype=np.int64),
              "confusion": np.zeros((1, task.n_outputs, n_classes), dtype=np.int64),
              "fg_things": np.zeros((1, 4), dtype=np.int64)}
    if label is not None:
        up = upsample_argmax(targets, (R, R))
        counts["confusion"][0] = confusion_matrix(up, label, task.n_outputs, n_classes)
        if thing_ids:
            counts["fg_things"][0] = foreground_thing_counts(attention_foreground(a), label, thing_ids, n_classes)
    return counts


def pseudo_metrics(sums, task, thing_ids, labelled) -> dict:
    """pseudo_metrics.json from the summed counts."""
    agree, conf, fg_things = (sums[k].sum(0) for k in ("agree", "confusion", "fg_things"))
    metrics = {"stored_label_agreement": 100 * int(agree[0]) / max(int(agree[1]), 1)}
    if labelled:
        s = segmentation_scores(conf)
        metrics.update(pseudo_miou=s["miou"], pseudo_pixel_accuracy=s["pixel_accuracy"])
        by_kind = miou_by_kind(s["per_class_iou"], task.class_kinds)  # miou_things, miou_stuff
        metrics.update({f"pseudo_{k}": v for k, v in by_kind.items()})
        # Does the [CLS] attention find the things? The rule that picks thing crops in `extract` (attention
        # above its mean), applied to this forward at R: thing pixels in the foreground vs in the whole image.
        if thing_ids and fg_things[1] and fg_things[3]:
            metrics.update(attention_foreground_thing_share=100 * int(fg_things[0]) / int(fg_things[1]),
                           thing_share=100 * int(fg_things[2]) / int(fg_things[3]))
    return metrics


def oracle_setup(stage, labelled):
    """For pseudo.oracle: the class -> concept map (transfgu/oracle.py), after checking that the train split has
    labels; before any image is read."""
    task = stage.params.task
    if not labelled:
        raise InputValueError(f"pseudo.oracle: true needs the train split's labels, and {stage.params.dataset.root} "
                              f"has none for {task.dataset} train: set pseudo.oracle: false")
    mapping = class_to_concept(task)
    named = [f"{name} -> {'none' if c < 0 else c}" for name, c in zip(task.class_names, mapping.tolist())]
    log.warning("pseudo.oracle: the masks are the train split's ground truth, NOT the method's (a diagnostic); "
                "class -> concept: %s", ", ".join(named))
    return torch.from_numpy(mapping)


def main(stage):
    task, cfg, R, dev = stage.params.task, stage.config, stage.params.dataset.R, stage.device
    index, centroids_path, out = stage.index, stage.dep("centroids.npz"), stage.out("pseudo_masks.h5")
    labelled = split_is_labelled(index, "train", task)
    oracle = oracle_setup(stage, labelled) if cfg.oracle else None
    backbone = stage.backbone() if oracle is None else None  # the oracle reads labels only
    precision = stage.precision()
    centroids = torch.from_numpy(read_centroids(centroids_path, task.n_things, task.n_stuff, task.granularity)).to(dev)
    data = SplitDataset(index, "train", R, lut=task.label_lut if labelled else None, decode=cfg.decode,
                        root=stage.params.dataset.root)
    patch = stage.params.backbone.patch
    h = R // patch
    scale = 1.0 / published_pseudo_batch(task.dataset) if cfg.grad_scale == "auto" else cfg.grad_scale
    log.info("%d train images at %d px, %d concepts, maps %dx%d, gradient scale %.4g, trunk in %s, %d process(es)",
             len(data), R, len(centroids), h, h, scale, precision, dist.world_size())
    # the attention diagnostic needs the method's attention (none with the oracle)
    thing_ids = [c for c, kind in enumerate(task.class_kinds) if kind == "thing"] if oracle is None else []
    key = stage.run_key([stage.dep("index.json"), centroids_path], precision=precision, device=dev.type)
    pieces = stage.pieces(out, data, cfg.batch_size, key, packed=pseudo_store.PACKED)
    with stage.timed():
        for batch, save in pieces.batches("pseudo"):
            label = batch["label"].to(dev) if labelled else None
            if oracle is None:
                images = backbone.normalize(images_on(batch, dev).float() / 255)
                a, q = pseudo_mask_parts(backbone, images, centroids, scale, cfg.mass, precision)
            else:
                a, q = oracle_mask_parts(label, oracle, task.n_concepts, patch)
            q16 = q.half()  # what is stored, cast on the device
            save({**pseudo_store.batch_arrays(a, q16), **batch_counts(a, q, q16, label, task, thing_ids, R)})
        if dist.is_main():
            sums = pseudo_store.write_pseudo_masks(out, pieces.paths(), [e["id"] for e in index["splits"]["train"]],
                                                   R, task.n_things, task.n_stuff, scale,
                                                   gather=("agree", "confusion", "fg_things"))
            metrics = pseudo_metrics(sums, task, thing_ids, labelled)
            write_json(stage.out("pseudo_metrics.json"), metrics)
            pieces.remove()
            log.info("wrote %s (%.1f MB, %.3f MB per image) and %s: %s", out, size_mb(out),
                     size_mb(out) / max(len(data), 1), stage.out("pseudo_metrics.json"), metrics)


if __name__ == "__main__":
    run_stage("pseudo", main, distributed=True, keeps="finished batches")
