"""Quick signals of whether a backbone suits the top-down pipeline, in about a minute on 2 CPU cores: does its
[CLS] attention single out the objects, and do its crop [CLS] features group crops by class? Measured on
labelled synthetic scenes (the pipeline's generator, a seed of their own), the way the extract stage sees them.

    python benchmarks/backbone_probe.py random                         # the random backbone (the reference)
    python benchmarks/backbone_probe.py weight/dino/teacher.pth ...    # one JSON line per backbone

Fields of each line:
- attention_foreground_thing_share / thing_share: percent of thing pixels in the attention foreground (patches
  above the map's mean attention, as extract selects crops) against percent in the images; at R (as the
  pseudo stage reports it) and `_2r` at 2R (where extract selects its windows);
- thing_crop_precision: percent of the windows extract would keep as thing crops whose majority label is a
  thing (the same rule picks them: foreground fraction > thing_fraction);
- thing_crop_purity: k-means of those crops' [CLS] features into as many clusters as there are thing kinds,
  percent of crops in their cluster's majority kind (a cluster = a concept of the pipeline); with
  thing_crop_purity_chance, the share of the most common kind (what one cluster would score);
- crop_purity / crop_purity_chance: the same over every kept crop (thing and stuff) into as many clusters as
  fine classes.
Higher than the random backbone on all of them is what a teacher worth a pipeline run shows first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transfgu.cluster import kmeans_fit  # noqa: E402
from transfgu.crops import (THING_STUFF_WINDOW_SIZES, attention_foreground, crop_windows, cut_crops,  # noqa: E402
                            select_crops, window_pixel_boxes)
from transfgu.data.synthetic import KINDS, NUM_THING_KINDS, generate_scene  # noqa: E402
from transfgu.metrics import foreground_thing_counts  # noqa: E402
from transfgu.models.vit import build_backbone  # noqa: E402


def scenes(n: int, size: int, seed: int):
    """n scenes at 2R = size: images (n, 3, size, size) in [0, 1] and fine labels (n, size, size); the same
    at R = size // 2 (images resized bilinearly by PIL as the loaders do, labels nearest)."""
    rng = np.random.default_rng(seed)
    big, big_lab, small, small_lab = [], [], [], []
    for _ in range(n):
        rgb, lab = generate_scene(rng, size)
        big.append(rgb)
        big_lab.append(lab)
        small.append(np.asarray(Image.fromarray(rgb).resize((size // 2, size // 2), Image.BILINEAR)))
        small_lab.append(np.asarray(Image.fromarray(lab).resize((size // 2, size // 2), Image.NEAREST)))
    img = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    return img(big), torch.from_numpy(np.stack(big_lab)).long(), img(small), torch.from_numpy(np.stack(small_lab)).long()


def window_majority(labels: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, n_classes: int):
    """The most frequent label inside each pixel box (M,) of its image."""
    out = torch.empty(len(boxes), dtype=torch.long)
    for m, ((y0, x0, y1, x1), i) in enumerate(zip(boxes.tolist(), image_index.tolist())):
        out[m] = torch.bincount(labels[i, y0:y1, x0:x1].flatten(), minlength=n_classes).argmax()
    return out


def purity(features: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> tuple[float, float]:
    """(percent of points in their k-means cluster's majority label, percent of the most common label)."""
    if len(features) <= k:
        return float("nan"), float("nan")
    assign = kmeans_fit(features, k, niter=50, seed=seed, backend="torch", device="cpu").assign
    hits = sum(np.bincount(labels[assign == c]).max() for c in np.unique(assign))
    return 100 * hits / len(labels), 100 * np.bincount(labels).max() / len(labels)


@torch.no_grad()
def probe(backbone, data, thing_fraction: float = 0.5, stuff_fraction: float = 0.8, batch: int = 16,
          crop_batch: int = 256, seed: int = 0) -> dict:
    big, big_lab, small, small_lab = data
    p, n_classes = backbone.patch_size, len(KINDS)
    things = list(range(NUM_THING_KINDS))
    R = small.shape[-1]
    windows = crop_windows(big.shape[-1] // p, THING_STUFF_WINDOW_SIZES)
    boxes = window_pixel_boxes(windows, p)
    counts = {"r": np.zeros(4, np.int64), "2r": np.zeros(4, np.int64)}
    feats, labels, is_thing_crop = [], [], []
    for s in range(0, len(big), batch):
        x_small = backbone.normalize(small[s:s + batch])
        a = backbone.cls_attention(x_small).view(len(x_small), R // p, R // p)
        counts["r"] += foreground_thing_counts(attention_foreground(a), small_lab[s:s + batch], things, n_classes)
        x = backbone.normalize(big[s:s + batch])
        g = x.shape[-1] // p
        a2 = backbone.cls_attention(x).view(len(x), g, g)
        counts["2r"] += foreground_thing_counts(attention_foreground(a2), big_lab[s:s + batch], things, n_classes)
        thing, stuff = select_crops(a2, windows, thing_fraction, stuff_fraction)
        for keep, kind in ((thing, True), (stuff, False)):
            img_idx, win_idx = keep.nonzero(as_tuple=True)
            for c in range(0, len(img_idx), crop_batch):
                i, w = img_idx[c:c + crop_batch], win_idx[c:c + crop_batch]
                feats.append(backbone(cut_crops(x, i, boxes[w], R))[:, 0].float())
                labels.append(window_majority(big_lab[s:s + batch], boxes[w], i, n_classes))
                is_thing_crop.append(torch.full((len(i),), kind))
    feats = torch.cat(feats).numpy() if feats else np.zeros((0, backbone.embed_dim), np.float32)
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
    is_thing_crop = torch.cat(is_thing_crop).numpy() if is_thing_crop else np.zeros(0, bool)
    t_feats, t_labels = feats[is_thing_crop], labels[is_thing_crop]
    tp, tc = purity(t_feats, t_labels, NUM_THING_KINDS, seed)
    ap, ac = purity(feats, labels, n_classes, seed)
    share = lambda c: (100 * c[0] / max(c[1], 1), 100 * c[2] / max(c[3], 1))  # noqa: E731
    (fg_r, all_r), (fg_2r, all_2r) = share(counts["r"]), share(counts["2r"])
    n = len(big)
    return {"attention_foreground_thing_share": round(fg_r, 2), "thing_share": round(all_r, 2),
            "attention_foreground_thing_share_2r": round(fg_2r, 2), "thing_share_2r": round(all_2r, 2),
            "thing_crops_per_image": round(len(t_labels) / n, 2), "crops_per_image": round(len(labels) / n, 2),
            "thing_crop_precision": round(100 * float(np.isin(t_labels, things).mean()), 2) if len(t_labels) else None,
            "thing_crop_purity": round(tp, 2), "thing_crop_purity_chance": round(tc, 2),
            "crop_purity": round(ap, 2), "crop_purity_chance": round(ac, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="teacher-backbone files (as backbone.checkpoint), or 'random'")
    ap.add_argument("--arch", default="vit_mini")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=200, help="scenes probed (default: 200)")
    ap.add_argument("--size", type=int, default=128, help="2R, the side extract sees (default: 128, R = 64)")
    ap.add_argument("--seed", type=int, default=7, help="scene seed (the pipeline's set: 0, pretraining: 101-116)")
    ap.add_argument("--thing-fraction", type=float, default=0.5)
    ap.add_argument("--stuff-fraction", type=float, default=0.8)
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        if c != "random" and not Path(c).is_file():
            ap.error(f"checkpoint not found: {c} (a teacher-backbone file, or 'random')")
    if args.size % (2 * args.patch_size):
        ap.error(f"--size {args.size}: expected a multiple of 2 x patch size ({2 * args.patch_size})")
    data = scenes(args.images, args.size, args.seed)
    for c in args.checkpoints:
        t0 = time.perf_counter()
        backbone = build_backbone(args.arch, args.patch_size, None if c == "random" else c)
        row = probe(backbone, data, args.thing_fraction, args.stuff_fraction)
        print(json.dumps({"checkpoint": c, "images": args.images, "size": args.size, "seed": args.seed, **row,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
