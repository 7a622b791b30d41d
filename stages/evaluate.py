"""evaluate: Hungarian-matched mIoU and pixel accuracy on the val split, per-class IoU, the confusion
matrix, and pictures (METHOD.md section 5)."""
import csv

import numpy as np
import torch

from common import DECODER, INDEX, METRICS, OUT, PSEUDO_METRICS, backbone_of, device, loader, log, setup, task_of, timed

from transfgu.data import SplitDataset
from transfgu.io import atomic_output, read_json, write_json
from transfgu.metrics import segmentation_scores
from transfgu.models.decoder import build_decoder
from transfgu.train import evaluate_loader
from transfgu.viz import comparison_picture, palette

PER_CLASS = OUT / "per_class_iou.csv"
CONFUSION = OUT / "confusion.csv"
CONFUSION_PLOT = OUT / "confusion_plot.csv"
PICTURES = OUT / "pictures"


def main():
    params = setup("evaluate")
    task, cfg, R = task_of(params), params["evaluate"], int(params["dataset"]["R"])
    dev = device()
    backbone = backbone_of(params, dev)
    index = read_json(INDEX)
    decoder = build_decoder(task.n_outputs, backbone.embed_dim)
    if not DECODER.is_file():
        raise SystemExit(f"{DECODER} not found: run the train stage first (dvc repro)")
    decoder.load_state_dict(torch.load(DECODER, map_location="cpu", weights_only=True), strict=True)
    decoder.to(dev).eval()
    data = SplitDataset(index, "val", R, lut=task.label_lut)
    names = list(task.class_names)
    log.info("%d val images at %d px, %d classes", len(data), R, len(names))
    kept = []  # (image, prediction, label) of the first n_pictures images

    def keep_pictures(batch, pred):
        for img, p, lab in zip(batch["image"], pred.cpu(), batch["label"]):
            if len(kept) < int(cfg["n_pictures"]):
                kept.append((img.permute(1, 2, 0).numpy(), p.numpy(), lab.numpy()))

    with timed("evaluate"):
        conf = evaluate_loader(backbone, decoder, loader(data, int(cfg["batch_size"]), int(cfg["num_workers"])),
                               task.n_outputs, len(names), dev, "evaluate", keep_pictures)
    s = segmentation_scores(conf)
    metrics = {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"], "n_images": len(data),
               "n_classes": len(names)}
    if PSEUDO_METRICS.is_file():  # the pseudo masks' own quality, shown beside the final result
        metrics.update({k: v for k, v in read_json(PSEUDO_METRICS).items() if k.startswith("pseudo_")})
    write_json(METRICS, metrics)
    with atomic_output(PER_CLASS) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou"])
        w.writerows([n, "" if v is None else round(v, 4)] for n, v in zip(names, s["per_class_iou"]))
    matched = s["matched_confusion"]  # rows: predicted (matched) class, columns: ground truth
    with atomic_output(CONFUSION) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["predicted \\ actual", *names])
        w.writerows([names[i], *matched[i].tolist()] for i in range(len(names)))
    with atomic_output(CONFUSION_PLOT) as tmp, open(tmp, "w", newline="") as f:
        # dvc's confusion template counts rows: one row per percent of each ground-truth class's pixels
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        share = matched / np.maximum(matched.sum(0, keepdims=True), 1)
        for gt in range(len(names)):
            for pr in range(len(names)):
                w.writerows([[names[gt], names[pr]]] * int(round(100 * share[pr, gt])))
    colors = palette(len(names))
    with atomic_output(PICTURES) as tmp:
        tmp.mkdir()
        for i, (img, pred, lab) in enumerate(kept):
            cls = np.where(s["mapping"][pred] >= 0, s["mapping"][pred], -1)
            comparison_picture(img, cls, lab, names, colors).save(tmp / f"{i:03d}_{index['splits']['val'][i]['id']}.png")
    log.info("miou %.2f, pixel accuracy %.2f -> %s, %s, %s, %d pictures in %s", s["miou"], s["pixel_accuracy"],
             METRICS, PER_CLASS, CONFUSION, len(kept), PICTURES)


if __name__ == "__main__":
    main()
