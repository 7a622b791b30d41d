"""evaluate: Hungarian-matched mIoU and pixel accuracy on the val split, per-class IoU, the confusion
matrix, the cluster -> class matching, and pictures (docs/method.md section 5). Without val labels it writes
the predictions only.

metrics.json (the DVC metric) holds the headline numbers only (miou, pixel_accuracy, the patch k-means baseline's,
miou_things / miou_stuff, and with evaluate.crf the same scores of the dense-CRF-refined predictions, crf_*, matched
on their own as STEGO does); eval_details.json the counts; cluster_classes.json which class each decoder output
stands for (read by `transfgu predict`).

Every batch's prediction PNGs go to a folder beside its piece (transfgu/pieces.py), which keeps the batch's
confusion counts and the pictures' data; under torchrun each rank takes every world-th batch still to do;
rank 0 sums the pieces' counts and writes the results. A re-run after an interruption computes only the
batches without a piece (docs/usage.md, "Interrupted runs").

    python stages/evaluate.py                          # the DVC stage: outputs/decoder.pt -> outputs/
    python stages/evaluate.py --decoder weight/trained/cocostuff_27_decoder.pt
                                                       # a published decoder -> outputs/published/<name>/
"""
import argparse
import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfgu import dist
from transfgu.baselines import patch_kmeans_confusion
from transfgu.crf import CrfPool, available_cpus, require_pydensecrf
from transfgu.data.dataset import SplitDataset
from transfgu.data.index import split_is_labelled
from transfgu.errors import InputFileNotFound
from transfgu.io import atomic_output, link_tree, write_csv, write_json
from transfgu.matching import match_clusters, unmatched_clusters, write_cluster_classes
from transfgu.metrics import confusion_matrix, miou_by_kind, segmentation_scores, upsample_argmax
from transfgu.models.decoder import build_decoder, load_decoder
from transfgu.segmenter import Segmenter
from transfgu.pieces import gather_batches
from transfgu.stage import log, run_stage
from transfgu.viz import comparison_picture


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", type=Path, help="evaluate this decoder state dict (e.g. a published one)")
    ap.add_argument("--out", type=Path, help="output folder (default outputs/, or outputs/published/<name>/)")
    return ap.parse_args(argv)


def crf_workers(stage) -> int:
    """Processes of the dense CRF: evaluate.num_workers when a number, else (auto) this process's share of the CPUs."""
    if stage.config.num_workers != "auto":
        return max(1, stage.config.num_workers)
    return max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def predict_split(stage, segmenter, precision, data, pieces, n_pictures, labelled, entries, crf=None):
    """Every batch of the val split: its prediction PNGs, confusion counts and the pictures' data, in pieces;
    with `crf` (a CrfPool) also the confusion counts and the pictures' data of the CRF-refined predictions."""
    task, dev = stage.params.task, stage.device
    n_classes = len(task.class_names)
    predictions_dir = pieces.dir / "predictions"  # every rank writes its images' predictions there
    predictions_dir.mkdir(exist_ok=True)
    for batch, save in pieces.batches("evaluate"):
        images = batch["image"].to(dev).float() / 255
        with torch.no_grad():
            logits, _ = segmenter(images, precision)
        pred = upsample_argmax(logits, images.shape[-2:])  # what Segmenter.predict gives
        conf = np.zeros((1, task.n_outputs, n_classes), dtype=np.int64)
        if labelled:
            conf[0] = confusion_matrix(pred, batch["label"].to(dev), task.n_outputs, n_classes)
        extra = {}
        if crf is not None:  # the CRF on the image the model saw, at its size (docs/method.md, "Dense CRF")
            refined = torch.from_numpy(crf.labels(batch["image"].permute(0, 2, 3, 1).numpy(), logits))
            extra["crf_confusion"] = np.zeros_like(conf)
            if labelled:
                extra["crf_confusion"][0] = confusion_matrix(refined, batch["label"], task.n_outputs, n_classes)
        pred = pred.cpu().numpy().astype(np.uint8)
        index_of = batch["index"].numpy()
        for j, i in enumerate(index_of.tolist()):  # the PNGs first: a batch's piece says they are complete
            Image.fromarray(pred[j]).save(predictions_dir / f"{entries[i]['id']}.png")
        kept = index_of < n_pictures  # this batch's images among the first n_pictures: their pictures' data
        picture = {"kept_index": index_of[kept], "kept_image": batch["image"][kept].permute(0, 2, 3, 1).numpy(),
                   "kept_pred": pred[kept]}
        if labelled:
            picture["kept_label"] = batch["label"][kept].numpy()
        if crf is not None:
            picture["kept_crf"] = refined[kept].numpy().astype(np.uint8)
        save({"confusion": conf, **extra, **picture})
    return predictions_dir


def baseline_scores(stage, backbone, data) -> dict:
    """The bottom-up reference: k-means of the same patch tokens into as many clusters as the decoder has outputs."""
    task, cfg = stage.params.task, stage.config
    plain = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=stage.workers())
    try:
        b = segmentation_scores(patch_kmeans_confusion(backbone, plain, task.n_outputs, len(task.class_names),
                                                       stage.device, seed=stage.params.seed))
    except ValueError as e:  # fewer patch tokens than clusters: a tiny val split
        log.warning("patch k-means baseline skipped: %s", e)
        return {}
    log.info("patch k-means baseline (%d clusters): miou %.2f, pixel accuracy %.2f", task.n_outputs, b["miou"],
             b["pixel_accuracy"])
    return {"baseline_miou": b["miou"], "baseline_pixel_accuracy": b["pixel_accuracy"]}


def write_scores(out: Path, s: dict, names: list) -> None:
    """per_class_iou.csv, confusion.csv and confusion_plot.csv (dvc's confusion template counts rows: one row per
    percent of each ground-truth class's pixels)."""
    matched = s["matched_confusion"]  # rows: predicted (matched) class, columns: ground truth
    write_csv(out / "per_class_iou.csv", ["class", "iou"],
              [[n, "" if v is None else round(v, 4)] for n, v in zip(names, s["per_class_iou"])])
    write_csv(out / "confusion.csv", ["predicted \\ actual", *names],
              [[names[i], *matched[i].tolist()] for i in range(len(names))])
    share = matched / np.maximum(matched.sum(0, keepdims=True), 1)
    write_csv(out / "confusion_plot.csv", ["actual", "predicted"],
              [[names[gt], names[pr]] for gt in range(len(names)) for pr in range(len(names))
               for _ in range(int(round(100 * share[pr, gt])))])


def main(stage, args):
    task, cfg, R = stage.params.task, stage.config, stage.params.dataset.R
    decoder_path = args.decoder or stage.dep("decoder.pt")
    outputs = stage.out("metrics.json").parent
    out = args.out or (outputs / "published" / decoder_path.stem if args.decoder else outputs)
    if cfg.crf:
        require_pydensecrf()  # a missing install extra: one line, before the backbone loads
    backbone, precision = stage.backbone(), stage.precision()
    index = stage.index
    if not decoder_path.is_file():
        raise InputFileNotFound(f"{decoder_path} not found" + ("" if args.decoder else ": run the train stage first"))
    decoder = build_decoder(task.n_outputs, backbone.embed_dim)
    load_decoder(decoder, decoder_path)  # a decoder of another shape: one line (BadInput)
    decoder.to(stage.device).eval()
    entries = index["splits"]["val"]
    labelled = split_is_labelled(index, "val", task)
    data = SplitDataset(index, "val", R, lut=task.label_lut if labelled else None, protocol=cfg.protocol,
                        root=stage.params.dataset.root)
    names = list(task.class_names)
    if cfg.protocol == "stego" and R != 320:
        log.warning("evaluate.protocol stego evaluates at dataset.R = %d px; STEGO's published protocol uses 320", R)
    workers = crf_workers(stage) if cfg.crf else 0
    log.info("%d val images at %d px (protocol %s), decoder %s, %s, %s%s", len(data), R, cfg.protocol, decoder_path,
             f"{len(names)} classes" if labelled else "no labels: predictions only", precision,
             f", dense CRF over {workers} processes" if cfg.crf else "")
    key = stage.run_key([stage.dep("index.json"), decoder_path], precision=precision, device=stage.device.type)
    pieces = stage.pieces(out / "predictions", data, cfg.batch_size, key)
    with stage.timed(), (CrfPool(workers) if cfg.crf else contextlib.nullcontext()) as crf:
        predictions_dir = predict_split(stage, Segmenter(backbone, decoder), precision, data, pieces,
                                        cfg.n_pictures, labelled, entries, crf)
    if not dist.is_main():
        return
    names_kept = ["confusion", "kept_index", "kept_image", "kept_pred"] + (["kept_label"] if labelled else []) \
        + (["crf_confusion", "kept_crf"] if cfg.crf else [])
    parts = gather_batches(pieces.paths(), names_kept)
    conf = parts["confusion"].sum(0)
    kept = [(int(i), parts["kept_image"][k], parts["kept_pred"][k], parts["kept_label"][k] if labelled else None,
             parts["kept_crf"][k] if cfg.crf else None)
            for k, i in enumerate(parts["kept_index"])]
    crf_clusters = None
    if labelled:
        s = segmentation_scores(conf)
        clusters = match_clusters(s["mapping"], names, s["per_class_iou"])
        # the headline, in the order `dvc exp show` shows it; the rest goes to eval_details.json
        metrics = {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"]}
        details = {"n_images": len(data), "n_classes": len(names), "labelled": True}
        if cfg.patch_kmeans_baseline:
            metrics.update(baseline_scores(stage, backbone, data))
        metrics.update(miou_by_kind(s["per_class_iou"], task.class_kinds))  # miou_things, miou_stuff
        if cfg.crf:  # the CRF's predictions matched on their own confusion, as STEGO's and CAUSE's evaluation does
            c = segmentation_scores(parts["crf_confusion"].sum(0))
            crf_clusters = match_clusters(c["mapping"], names, c["per_class_iou"])
            metrics.update({"crf_miou": c["miou"], "crf_pixel_accuracy": c["pixel_accuracy"]})
            metrics.update({f"crf_{k}": v for k, v in miou_by_kind(c["per_class_iou"], task.class_kinds).items()})
            log.info("with the dense CRF: miou %.2f, pixel accuracy %.2f", c["miou"], c["pixel_accuracy"])
        write_scores(out, s, names)
        log.info("miou %.2f, pixel accuracy %.2f", s["miou"], s["pixel_accuracy"])
    else:
        clusters = unmatched_clusters(task.n_outputs)
        metrics, details = {}, {"n_images": len(data), "labelled": False}
        for name in ("per_class_iou.csv", "confusion.csv", "confusion_plot.csv"):  # declared outputs, kept valid
            write_csv(out / name, ["class", "iou"] if name.startswith("per") else ["actual", "predicted"], [])
        log.info("no labels: wrote the predictions only")
    write_json(out / "metrics.json", metrics)
    write_json(out / "eval_details.json", details)
    write_cluster_classes(out / "cluster_classes.json", clusters, names if labelled else [], decoder=decoder_path)
    with atomic_output(out / "pictures") as tmp:
        tmp.mkdir()
        crf_legend = (crf_clusters or clusters).legend  # the CRF's predictions in the colours of their own matching
        for i, img, pred, lab, refined in kept:  # prediction in its matched classes' colours, ground truth in the classes'
            comparison_picture(img, clusters.legend[pred], lab, clusters.legend_names, clusters.legend_colors,
                               crf=None if refined is None else crf_legend[refined]
                               ).save(tmp / f"{i:03d}_{entries[i]['id']}.png")
    with atomic_output(out / "predictions") as tmp:  # hard links: the pieces stay whole until removed
        link_tree(predictions_dir, tmp)
    pieces.remove()
    log.info("wrote %s, %d predictions (cluster ids, R x R PNG) in %s, %d pictures in %s", out / "metrics.json",
             len(data), out / "predictions", len(kept), out / "pictures")


if __name__ == "__main__":
    run_stage("evaluate", functools.partial(main, args=parse_args()), distributed=True, keeps="finished batches")
