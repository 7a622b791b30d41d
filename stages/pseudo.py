"""pseudo: gradient-weighted attention pseudo masks of the train split (METHOD.md section 3), and their
own quality against the ground truth where the split has labels."""
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (CENTROIDS, INDEX, PSEUDO_MASKS, PSEUDO_METRICS, backbone_of, device, grad_scale_of, loader,
                    log, setup, size_mb, task_of, timed)

from transfgu.data import SplitDataset
from transfgu.io import atomic_output, read_json, write_image_ids, write_json
from transfgu.losses import soft_targets
from transfgu.metrics import confusion_matrix, segmentation_scores
from transfgu.pseudo import assemble_pseudo_masks, pseudo_mask_parts


def main():
    params = setup("pseudo")
    task, cfg, R = task_of(params), params["pseudo"], int(params["dataset"]["R"])
    dev = device()
    backbone = backbone_of(params, dev)
    if not CENTROIDS.is_file():
        raise SystemExit(f"{CENTROIDS} not found: run the cluster stage first (dvc repro)")
    stored = np.load(CENTROIDS)
    if (int(stored["n_things"]), int(stored["n_stuff"])) != (task.n_things, task.n_stuff):
        raise SystemExit(f"{CENTROIDS} holds {int(stored['n_things'])}+{int(stored['n_stuff'])} concepts, "
                         f"granularity {task.granularity} needs {task.n_things}+{task.n_stuff}: re-run cluster")
    centroids = torch.from_numpy(stored["centroids"]).to(dev)
    index = read_json(INDEX)
    data = SplitDataset(index, "train", R, lut=task.label_lut)
    h = R // backbone.patch_size
    scale = grad_scale_of(params)
    log.info("%d train images at %d px, %d concepts, maps %dx%d, gradient scale %.4g", len(data), R,
             len(centroids), h, h, scale)
    conf = np.zeros((task.n_outputs, len(task.class_names)), dtype=np.int64)
    has_labels, agree, total = False, 0, 0
    with timed("pseudo"), atomic_output(PSEUDO_MASKS) as tmp, h5py.File(tmp, "w") as h5:
        attention = h5.create_dataset("attention", shape=(len(data), h, h), dtype="float32", chunks=(1, h, h))
        gradient = h5.create_dataset("gradient", shape=(len(data), len(centroids), h, h), dtype="float16",
                                     chunks=(1, len(centroids), h, h))
        for batch in tqdm(loader(data, int(cfg["batch_size"]), int(cfg["num_workers"])), desc="pseudo"):
            images = backbone.normalize(batch["image"].to(dev).float() / 255)
            a, q = pseudo_mask_parts(backbone, images, centroids, scale, float(cfg["mass"]))
            rows = slice(int(batch["index"][0]), int(batch["index"][-1]) + 1)
            attention[rows] = a.cpu().numpy()
            gradient[rows] = q.half().cpu().numpy()
            maps = assemble_pseudo_masks(a, q)
            labels = soft_targets(maps, task.things_only).argmax(1)
            stored = assemble_pseudo_masks(a, q.half())
            agree += int((soft_targets(stored, task.things_only).argmax(1) == labels).sum())
            total += labels.numel()
            if "label" in batch:
                has_labels = True
                up = F.interpolate(soft_targets(maps, task.things_only), size=(R, R), mode="bilinear",
                                   align_corners=False).argmax(1)
                conf += confusion_matrix(up, batch["label"].to(dev), task.n_outputs, len(task.class_names))
        write_image_ids(h5, [e["id"] for e in index["splits"]["train"]])
        h5.attrs.update(R=R, n_things=task.n_things, n_stuff=task.n_stuff, grad_scale=scale)
    metrics = {"stored_label_agreement": 100 * agree / max(total, 1)}
    if has_labels:
        s = segmentation_scores(conf)
        metrics.update(pseudo_miou=s["miou"], pseudo_pixel_accuracy=s["pixel_accuracy"])
    write_json(PSEUDO_METRICS, metrics)
    log.info("wrote %s (%.1f MB, %.3f MB per image) and %s: %s", PSEUDO_MASKS, size_mb(PSEUDO_MASKS),
             size_mb(PSEUDO_MASKS) / max(len(data), 1), PSEUDO_METRICS, metrics)


if __name__ == "__main__":
    main()
