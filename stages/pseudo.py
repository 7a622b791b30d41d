"""pseudo: gradient-weighted attention pseudo masks of the train split (docs/method.md section 3), and their
own quality against the ground truth where the split has labels.

Every batch's maps, with its counts for the metrics (confusion matrix, stored-label agreement, attention
foreground), are kept in a piece (transfgu/shards.py) as soon as they are computed; under torchrun each rank
takes every world-th batch still to do; rank 0 assembles the pieces in batch order (the same file whatever the
number of processes) and sums their counts. A re-run after an interruption computes only the batches without
a piece (README, "Interrupted runs")."""
import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from common import (CENTROIDS, INDEX, PSEUDO_MASKS, PSEUDO_METRICS, log, run_key, setup, size_mb, stage_main,
                    task_of, timed)
from runtime import backbone_of, decode_of, device, grad_scale_of, precision_of, workers_of

from transfgu import dist, faults, pseudo_store
from transfgu.centroids import read_centroids
from transfgu.crops import attention_foreground
from transfgu.data.dataset import SplitDataset, images_on
from transfgu.data.index import split_is_labelled
from transfgu.io import read_json, write_json
from transfgu.losses import soft_targets
from transfgu.metrics import (confusion_matrix, foreground_thing_counts, miou_by_kind, segmentation_scores,
                              upsample_argmax)
from transfgu.pieces import BatchPieces
from transfgu.pseudo import assemble_pseudo_masks, pseudo_mask_parts


@record
@stage_main
def main():
    params = setup("pseudo")
    task, cfg, R = task_of(params), params["pseudo"], int(params["dataset"]["R"])
    dev = device()
    backbone = backbone_of(params, dev)
    precision = precision_of(params, "pseudo", dev, default="fp32")
    centroids = torch.from_numpy(read_centroids(CENTROIDS, task.n_things, task.n_stuff, task.granularity)).to(dev)
    index = read_json(INDEX)
    labelled = split_is_labelled(index, "train", task)
    data = SplitDataset(index, "train", R, lut=task.label_lut if labelled else None, decode=decode_of(params, "pseudo"),
                        param="pseudo.decode")
    h = R // backbone.patch_size
    scale = grad_scale_of(params)
    log.info("%d train images at %d px, %d concepts, maps %dx%d, gradient scale %.4g, trunk in %s, %d process(es)",
             len(data), R, len(centroids), h, h, scale, precision, dist.world_size())
    n_classes = len(task.class_names)
    # Does the [CLS] attention find the things? The rule that picks thing crops in `extract` (attention above
    # its mean), applied to this forward at R: thing pixels in the foreground vs in the whole image.
    thing_ids = [c for c, kind in enumerate(task.class_kinds) if kind == "thing"]
    key = run_key("pseudo", params, [INDEX, CENTROIDS], precision=precision, device=dev.type)
    pieces = BatchPieces(PSEUDO_MASKS, data, int(cfg["batch_size"]), workers_of(params, "pseudo"), key, "pseudo",
                         packed=pseudo_store.PACKED, on_point=faults.hook("pseudo"))
    with timed("pseudo"):
        for batch, save in pieces.batches("pseudo"):
            images = backbone.normalize(images_on(batch, dev).float() / 255)
            a, q = pseudo_mask_parts(backbone, images, centroids, scale, float(cfg["mass"]), precision)
            q16 = q.half()  # what is stored, cast on the device
            targets = soft_targets(assemble_pseudo_masks(a, q), task.things_only)
            labels = targets.argmax(1)
            stored16 = soft_targets(assemble_pseudo_masks(a, q16), task.things_only).argmax(1)
            # this batch's counts, kept with its maps: labels equal after float16 storage, labels
            counts = {"agree": np.array([[int((stored16 == labels).sum()), labels.numel()]], dtype=np.int64),
                      "confusion": np.zeros((1, task.n_outputs, n_classes), dtype=np.int64),
                      "fg_things": np.zeros((1, 4), dtype=np.int64)}
            if labelled:
                up = upsample_argmax(targets, (R, R))
                counts["confusion"][0] = confusion_matrix(up, batch["label"].to(dev), task.n_outputs, n_classes)
                if thing_ids:
                    counts["fg_things"][0] = foreground_thing_counts(attention_foreground(a), batch["label"].to(dev),
                                                                     thing_ids, n_classes)
            save({**pseudo_store.batch_arrays(a, q16), **counts})
        if dist.is_main():
            sums = pseudo_store.write_pseudo_masks(PSEUDO_MASKS, pieces.paths(),
                                                   [e["id"] for e in index["splits"]["train"]], R, task.n_things,
                                                   task.n_stuff, scale, gather=("agree", "confusion", "fg_things"))
            agree, conf, fg_things = (sums[k].sum(0) for k in ("agree", "confusion", "fg_things"))
            metrics = {"stored_label_agreement": 100 * int(agree[0]) / max(int(agree[1]), 1)}
            if labelled:
                s = segmentation_scores(conf)
                metrics.update(pseudo_miou=s["miou"], pseudo_pixel_accuracy=s["pixel_accuracy"])
                by_kind = miou_by_kind(s["per_class_iou"], task.class_kinds)  # miou_things, miou_stuff
                metrics.update({f"pseudo_{k}": v for k, v in by_kind.items()})
                if thing_ids and fg_things[1] and fg_things[3]:
                    metrics.update(attention_foreground_thing_share=100 * int(fg_things[0]) / int(fg_things[1]),
                                   thing_share=100 * int(fg_things[2]) / int(fg_things[3]))
            write_json(PSEUDO_METRICS, metrics)
            pieces.remove()
            log.info("wrote %s (%.1f MB, %.3f MB per image) and %s: %s", PSEUDO_MASKS, size_mb(PSEUDO_MASKS),
                     size_mb(PSEUDO_MASKS) / max(len(data), 1), PSEUDO_METRICS, metrics)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
