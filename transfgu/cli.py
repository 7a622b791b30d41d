"""The `transfgu` console command.

    transfgu predict IMAGES... [--decoder outputs/decoder.pt] [--classes FILE] [--params params.yaml] [--out predictions]
                     [--crf [--crf-workers N]]
    transfgu pretrain --images IMAGES... [--steps N | --epochs N] [--minutes M] ... (transfgu/pretrain.py)

IMAGES are image files, folders (every image inside, recursively) or glob patterns. For each image it
writes <stem>_label.png (raw cluster ids at the image's own size), <stem>_color.png and <stem>_overlay.png,
and classes.txt says what each cluster id is. The names and colours come from the cluster -> class matching
that `evaluate` saved next to the decoder (outputs/cluster_classes.json; --classes for another file): the
colour of a cluster is that of its matched class in outputs/pictures. Without a matching the outputs are
called "cluster i". The backbone and working resolution come from params.yaml (the ones the decoder was
trained with). --crf refines each prediction with the dense CRF of evaluate.crf (the `crf` install extra): on the
image at the working resolution, the refined probabilities then upsampled to the image's own size."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import pretrain
from .crf import CrfPool, available_cpus, probabilities, require_pydensecrf
from .data.images import ImageFiles, collect_images, to_rgb, unreadable
from .config import load_params
from .errors import InputFileNotFound, InputValueError
from .matching import ClusterNames, read_cluster_classes, unmatched_clusters
from .models.archs import ALIASES, ARCHS, resolve_patch
from .models.decoder import build_decoder, load_decoder
from .models.vit import build_backbone
from .precision import PRECISIONS, resolve_precision
from .progress import progress
from .segmenter import Segmenter
from .stage import one_line_errors
from .viz import colorize

log = logging.getLogger("transfgu.predict")


def classes_table(clusters: ClusterNames) -> str:
    """classes.txt: one line per cluster id: its name, matched class id and IoU (- when none) and colour."""
    rows = ["cluster\tname\tclass_id\tiou\tcolor"]
    for i, (name, k, iou, c) in enumerate(zip(clusters.names, clusters.classes, clusters.iou, clusters.colors)):
        rows.append(f"{i}\t{name}\t{'-' if k is None else k}\t{'-' if iou is None else f'{iou:.2f}'}\t"
                    + "#%02x%02x%02x" % tuple(int(v) for v in c))
    return "\n".join(rows) + "\n"


def predict_files(paths, out: Path, backbone, decoder, size: int, batch_size: int = 16, num_workers: int = 0,
                  device="cpu", alpha: float = 0.5, clusters: ClusterNames | None = None, precision: str = "fp32",
                  crf: CrfPool | None = None):
    """Segment image files; write label, colour and overlay PNGs and classes.txt into `out`. `clusters` names and
    colours the decoder's outputs (matching.read_cluster_classes; None: "cluster i"). `crf`: refine each image's
    probabilities at `size` with the dense CRF, then upsample the refined ones. Returns the label paths."""
    out.mkdir(parents=True, exist_ok=True)
    clusters = clusters or unmatched_clusters(decoder.n_cls)
    colors = clusters.colors
    segmenter = Segmenter(backbone, decoder)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, size), batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    written, stems = [], {}
    for batch in progress(loader, desc="predict", unit="batch"):
        with torch.no_grad():
            logits, _ = segmenter(batch["image"].to(device).float() / 255, precision)
        if crf is not None:  # the marginals at `size` take the logits' place
            images = batch["image"].permute(0, 2, 3, 1).numpy()
            logits = torch.from_numpy(np.stack(list(crf.refine(zip(images, probabilities(logits, (size, size)))))))
        for j, i in enumerate(batch["index"].tolist()):
            H, W = int(batch["height"][j]), int(batch["width"][j])
            label = F.interpolate(logits[j:j + 1], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
            label = label.cpu().numpy().astype(np.uint8 if decoder.n_cls <= 256 else np.uint16)
            path = paths[i]
            stem = path.stem if path.stem not in stems else f"{path.stem}_{stems[path.stem]}"
            stems[path.stem] = stems.get(path.stem, 0) + 1
            color = colorize(label.astype(np.int64), colors)
            with Image.open(path) as im:
                rgb = np.asarray(to_rgb(im), dtype=np.float32)
            overlay = (1 - alpha) * rgb + alpha * color
            Image.fromarray(label).save(out / f"{stem}_label.png")
            Image.fromarray(color).save(out / f"{stem}_color.png")
            Image.fromarray(overlay.round().astype(np.uint8)).save(out / f"{stem}_overlay.png")
            written.append(out / f"{stem}_label.png")
    (out / "classes.txt").write_text(classes_table(clusters))
    return written


def cluster_names_for(decoder_path: Path, n_out: int, classes=None) -> ClusterNames | None:
    """The matching for a decoder: `classes` (an error when missing or not for this decoder), else
    cluster_classes.json next to the decoder when there is one for it, else None ("cluster i", with a warning)."""
    path = Path(classes) if classes else decoder_path.with_name("cluster_classes.json")
    if not path.is_file():
        if classes:
            raise InputFileNotFound(f"--classes {path} not found (evaluate writes outputs/cluster_classes.json)")
        log.warning("no cluster -> class matching at %s (the evaluate stage writes it): the outputs are called "
                    "'cluster i'", path)
        return None
    try:
        clusters = read_cluster_classes(path, n_out, decoder_path)
    except (ValueError, KeyError, TypeError) as e:
        if classes:
            raise InputValueError(str(e)) from None
        log.warning("%s: the outputs are called 'cluster i'", e)
        return None
    log.info("names and colours from %s%s", path, "" if clusters.matched else " (no labels: 'cluster i')")
    return clusters


def cmd_predict(args):
    params = None
    if Path(args.params).is_file():  # checked like the stages check it, without the dataset's own files
        params = load_params(args.params, check_data=False)
    elif not args.arch:
        raise InputFileNotFound(f"{args.params} not found: pass --params or --arch/--patch-size/--checkpoint/--size")
    arch = args.arch or params.backbone.arch
    if arch not in ARCHS:
        raise InputValueError(f"--arch / backbone.arch: unknown '{arch}', expected one of {sorted(ARCHS)}")
    patch = args.patch_size
    if patch is None and params and ARCHS[arch].patch_size is None:  # DINO: 8 or 16 from params.yaml
        patch = params.backbone.patch_size
    patch = resolve_patch(arch, patch)  # DINOv2 / DINOv3: their own
    checkpoint = args.checkpoint if args.checkpoint is not None else (params and params.backbone.checkpoint)
    size = args.size or params.dataset.R
    if size < patch or size % patch:
        raise InputValueError(f"--size / dataset.R: expected a multiple of the patch size {patch}, got {size}")
    seed = params.seed if params else 0
    if args.crf:
        require_pydensecrf("--crf", "or leave --crf out")  # a missing install extra: one line, before any work
    decoder_path = Path(args.decoder)
    if not decoder_path.is_file():
        raise InputFileNotFound(f"{decoder_path} not found: train one with `dvc repro` or pass --decoder")
    try:
        state = torch.load(decoder_path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickled object we do not load
        raise InputValueError(f"{decoder_path}: not a decoder state dict ({e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "cls_emb" not in state:
        raise InputValueError(f"{decoder_path}: not a decoder state dict (no cls_emb)")
    n_out, width = state["cls_emb"].shape[1], state["cls_emb"].shape[2]
    if ARCHS[arch].embed_dim != width:
        fits = sorted(a for a, size in ARCHS.items() if size.embed_dim == width and a not in ALIASES) \
            or ["none of ours"]
        raise InputValueError(f"{decoder_path} was trained on a backbone of width {width} ({', '.join(fits)}), but "
                              f"the backbone is {arch} of width {ARCHS[arch].embed_dim}: pass --arch (and "
                              f"--checkpoint) of the backbone it was trained with, or its params.yaml")
    paths = collect_images(args.images)
    if args.skip_bad:
        bad = {p: reason for p in paths if (reason := unreadable(p))}
        for p, reason in bad.items():
            log.warning("skipped %s", reason)
        paths = [p for p in paths if p not in bad]
        if not paths:
            raise InputFileNotFound(f"none of the {len(bad)} images could be read")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = build_backbone(arch, patch, checkpoint, seed=seed).to(device)
    if not checkpoint:
        log.warning("backbone %s/%d has RANDOM weights (no checkpoint)", arch, patch)
    decoder = load_decoder(build_decoder(n_out, backbone.embed_dim), decoder_path).to(device).eval()
    clusters = cluster_names_for(decoder_path, n_out, args.classes)
    precision = resolve_precision(args.precision or (params.evaluate.precision if params else "auto"), device)
    log.info("%d images, decoder %s (%d channels), backbone %s/%d at %d px on %s, %s", len(paths), decoder_path,
             n_out, arch, patch, size, device, precision)
    t0 = time.time()
    crf = CrfPool(args.crf_workers or available_cpus()) if args.crf else None
    try:
        written = predict_files(paths, Path(args.out), backbone, decoder, size, args.batch_size, args.num_workers,
                                device, clusters=clusters, precision=precision, crf=crf)
    finally:
        if crf is not None:
            crf.close()
    log.info("wrote %d label / colour / overlay PNG triples to %s in %.1f s", len(written), args.out,
             time.time() - t0)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(name)s] %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(prog="transfgu", description="TransFGU unsupervised semantic segmentation")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment images with a trained decoder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--decoder", default="outputs/decoder.pt", help="decoder state dict (default: %(default)s)")
    p.add_argument("--classes", help="cluster -> class matching written by evaluate (default: cluster_classes.json "
                                     "next to the decoder, when present)")
    p.add_argument("--params", default="params.yaml", help="params file with backbone and dataset.R")
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--arch", help="backbone arch (overrides params)")
    p.add_argument("--patch-size", type=int, help="backbone patch size (overrides params)")
    p.add_argument("--checkpoint", help="backbone checkpoint (overrides params)")
    p.add_argument("--size", type=int, help="working resolution R (overrides params)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read (with a warning) "
                   "instead of stopping at the first one")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--crf", action="store_true", help="refine the predictions with the dense CRF (STEGO's kernels; "
                   "needs pip install 'transfgu[crf]')")
    p.add_argument("--crf-workers", type=int, help="processes of the CRF (default: every CPU)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 | bf16 | auto = bf16 on a GPU (default: evaluate.precision of params, else auto)")
    q = sub.add_parser("pretrain", help="pretrain a backbone with DINO on image files (docs/usage.md, \"Pretraining\")",
                       description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pretrain.add_arguments(q)
    args = ap.parse_args(argv)
    if args.command == "predict":
        with one_line_errors("no complete output was written for the image being segmented"):
            cmd_predict(args)
    elif args.command == "pretrain":
        logging.getLogger().handlers[0].setFormatter(
            logging.Formatter("%(asctime)s [pretrain] %(message)s", datefmt="%H:%M:%S"))
        with one_line_errors("the last saved state is kept: re-run with --resume to continue"):
            pretrain.run(args)


if __name__ == "__main__":
    main()
