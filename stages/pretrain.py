"""Pretrain a backbone with DINO on your own images (not a DVC stage; see README, "Pretraining a backbone
on your own images (DINO)").

    python stages/pretrain.py --images data/my_images/images/train 'more/*.jpg' --arch vit_mini \
        --patch-size 8 --global-size 64 --local-size 32 --n-local 4 --epochs 100 --batch-size 64 \
        --lr 5e-4 --out weight/dino/dino_vit_mini8_synthetic.pth --seed 0 [--device cuda]

Writes the checkpoint (official DINO layout: the EMA teacher under "teacher", keys "backbone.*" and
"head.*"; the student under "student") and a per-step loss curve `<out>.loss.csv` next to it. Point
`backbone.checkpoint` in params.yaml at the checkpoint to use the teacher backbone in the pipeline."""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from transfgu.data.images import ImageFiles, collect_images
from transfgu.dino import DINOHead, DINOTrainer, MultiCrop, save_dino_checkpoint
from transfgu.io import atomic_output
from transfgu.models.vit import ARCHS, DinoViT

log = logging.getLogger("transfgu.pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", required=True, help="image files, folders (recursive) or glob patterns")
    ap.add_argument("--arch", default="vit_mini", choices=sorted(ARCHS))
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=64, help="side of the 2 global crops (px)")
    ap.add_argument("--local-size", type=int, default=32, help="side of the local crops (px)")
    ap.add_argument("--n-local", type=int, default=4, help="number of local crops")
    ap.add_argument("--image-size", type=int, help="images are loaded at this side (default: 2 * global size)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (not scaled by the batch size)")
    ap.add_argument("--min-lr", type=float, default=1e-6)
    ap.add_argument("--warmup-epochs", type=int, help="linear lr warm-up (default: epochs // 10)")
    ap.add_argument("--weight-decay", type=float, default=0.04)
    ap.add_argument("--weight-decay-end", type=float, default=0.4)
    ap.add_argument("--momentum-teacher", type=float, default=0.996)
    ap.add_argument("--teacher-temp", type=float, default=0.04, help="final teacher temperature")
    ap.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    ap.add_argument("--warmup-teacher-temp-epochs", type=int, default=0)
    ap.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer frozen")
    ap.add_argument("--clip-grad", type=float, default=3.0)
    ap.add_argument("--out-dim", type=int, default=4096, help="DINO head output dimension")
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--bottleneck-dim", type=int, default=256)
    ap.add_argument("--out", default="weight/dino/dino_vit_mini8_synthetic.pth", help="checkpoint to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward passes")
    ap.add_argument("--num-workers", type=int, default=0, help="image loading processes")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def check_sizes(args) -> None:
    for name in ("global_size", "local_size"):
        value = getattr(args, name)
        if value <= 0 or value % args.patch_size:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be a positive multiple of the patch size "
                             f"{args.patch_size}")
    if args.epochs < 1 or args.batch_size < 1 or args.n_local < 0:
        raise ValueError("--epochs and --batch-size must be >= 1 and --n-local >= 0")


def write_loss_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(args) -> None:
    t_start = time.time()
    check_sizes(args)
    paths = collect_images(args.images)
    image_size = args.image_size or 2 * args.global_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    dataset = ImageFiles(paths, image_size)
    batch_size = min(args.batch_size, len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)

    backbone = DinoViT(args.arch, args.patch_size)  # seeded above; trainable (build_backbone would freeze it)
    head = DINOHead(backbone.embed_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim)
    multicrop = MultiCrop(args.global_size, args.local_size, args.n_local)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else args.epochs // 10
    trainer = DINOTrainer(
        backbone, head, multicrop, epochs=args.epochs, steps_per_epoch=steps_per_epoch, lr=args.lr,
        min_lr=args.min_lr, warmup_epochs=warmup, weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end, momentum_teacher=args.momentum_teacher, clip_grad=args.clip_grad,
        freeze_last_layer=args.freeze_last_layer, warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp, warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
        generator=torch.Generator().manual_seed(args.seed), device=device, amp=args.amp)
    n_params = sum(p.numel() for p in trainer.student.parameters())
    log.info("%d images at %d px, %s/%d + head (%d parameters) on %s; %d epochs x %d steps of %d images, "
             "%d crops per image (2 x %d px + %d x %d px)", len(paths), image_size, args.arch, args.patch_size,
             n_params, device, args.epochs, steps_per_epoch, batch_size, multicrop.n_crops, args.global_size,
             args.n_local, args.local_size)

    t_train = time.time()
    for epoch in range(args.epochs):
        t0 = time.time()
        batches = (batch["image"].to(device, non_blocking=True).float().div_(255) for batch in loader)
        losses = trainer.train_epoch(batches, epoch, progress=not args.no_progress)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f} "
              f"(lr {trainer.history[-1]['lr']:.2e}, {time.time() - t0:.1f} s)", flush=True)
    train_s = time.time() - t_train

    out = Path(args.out)
    save_dino_checkpoint(out, trainer.teacher["backbone"], trainer.student["backbone"], trainer.teacher["head"],
                         trainer.student["head"], extra={"args": vars(args), "epoch": args.epochs})
    curve = out.with_name(out.name + ".loss.csv")
    write_loss_csv(curve, trainer.history)
    print(f"wrote {out} and {curve}; training {train_s:.1f} s, total wall time {time.time() - t_start:.1f} s",
          flush=True)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [pretrain] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, OSError, ValueError) as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
