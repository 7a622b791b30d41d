"""`transfgu pretrain`: DINO pretraining of a ViT backbone on image files (not a DVC stage; docs/usage.md, "Pretraining
a backbone on your own images (DINO)").

    transfgu pretrain --images data/my_images 'more/*.jpg' --arch vit_mini --patch-size 8 --global-size 64 \
        --local-size 32 --n-local 4 [--global-scale 0.4 1 --local-scale 0.05 0.4] --steps 10000 \
        --batch-size 256 --lr 5e-4 \
        --out weight/dino/dino_vit_mini8_synthetic.pth [--minutes 4] [--device cuda] [--amp] [--compile]

Length: `--steps` optimisation steps, or `--epochs` passes over the images (`--steps` wins). The lr, weight
decay and teacher momentum schedules are planned over that length. `--minutes` is a safety stop only: after
the step that crosses the wall-clock budget the run stops, writes everything as at the end (the schedules
then stopped part-way: lr not yet at its minimum, momentum not yet at 1) and keeps its state file, so the
same command run again resumes and finishes the planned schedule.

Writes
- `<out>`: the official DINO layout (EMA teacher under "teacher", keys "backbone.*" and "head.*"; the student
  under "student"; "arch", "patch_size", "args", "steps_done"): `backbone.checkpoint` loads it;
- `<out stem>_teacher.pth` (`--teacher-out`): the teacher backbone only ("teacher": "backbone.*"), the file to
  ship (a vit_mini is about 7 MB);
- `<out>.loss.csv`: one row per step (step, epoch, loss, lr, weight_decay, momentum, teacher_temp,
  images_per_s);
- `<out>.summary.json`: steps planned / done, why it stopped, images/s, losses, wall times;
- `<out>.state` while it runs: the whole training state (student, teacher, head, optimizer, loss centre, step,
  RNG states, history), rewritten atomically every `--checkpoint-every` steps / `--checkpoint-minutes`
  minutes and at a budget stop. A run with the same arguments resumes from it (`--resume` insists on it),
  and gives the same weights as an uninterrupted run (on the same device; on the CPU to the bit). It is
  removed when the planned steps are done.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import restart_from_checkpoint, restore_rng, save_on_master
from .data.images import ImageFiles, collect_images
from .devices import to_device
from .dino import DINOHead, DINOTrainer, MultiCrop, save_dino_checkpoint
from .dist import epoch_permutation
from .errors import InputValueError
from .io import atomic_output, fingerprint
from .models.archs import DINO_V1_ARCHS
from .models.vit import DinoViT

log = logging.getLogger("transfgu.pretrain")

# arguments that do not change the result: a run resumes across changes of these
NOT_IN_KEY = {"minutes", "checkpoint_every", "checkpoint_minutes", "resume", "no_progress", "num_workers",
              "log_every", "stop_after", "preload", "teacher_out", "command", "func", "compile", "compile_backend"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", nargs="+", required=True, help="image files, folders (recursive) or glob patterns")
    ap.add_argument("--arch", default="vit_mini", choices=sorted(DINO_V1_ARCHS), help="a DINO (v1) ViT")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=64, help="side of the 2 global crops (px)")
    ap.add_argument("--local-size", type=int, default=32, help="side of the local crops (px)")
    ap.add_argument("--n-local", type=int, default=4, help="number of local crops")
    ap.add_argument("--global-scale", type=float, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"),
                    help="area fraction of the image each global crop covers, drawn uniformly in [MIN, MAX] "
                         "(DINO's --global_crops_scale; default: %(default)s)")
    ap.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"),
                    help="the same for the local crops (DINO's --local_crops_scale; default: %(default)s)")
    ap.add_argument("--image-size", type=int, help="images are loaded at this side (default: 2 * global size)")
    ap.add_argument("--epochs", type=int, default=100, help="passes over the images (unless --steps)")
    ap.add_argument("--steps", type=int, help="total optimisation steps (instead of --epochs); the schedules "
                    "span them")
    ap.add_argument("--minutes", type=float, help="wall-clock budget of this invocation: stop after the step that "
                    "crosses it, write the outputs and keep the state (a re-run resumes); a safety stop, the "
                    "schedules stay planned over --steps / --epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (not scaled by the batch size)")
    ap.add_argument("--min-lr", type=float, default=1e-6)
    ap.add_argument("--warmup-epochs", type=int, help="linear lr warm-up (default: epochs // 10)")
    ap.add_argument("--warmup-steps", type=int, help="linear lr warm-up in steps (default with --steps: steps // 10)")
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
    ap.add_argument("--teacher-out", help="teacher-backbone-only file (default: <out stem>_teacher.pth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward passes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student and teacher backbones")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: %(default)s; "
                    "eager: no code generation, to check the wiring)")
    ap.add_argument("--preload", action="store_true", help="decode every image once and keep them all on the "
                    "device as uint8 (fast on a GPU; same batches as without)")
    ap.add_argument("--num-workers", type=int, default=0, help="image loading processes")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="write the state file every N steps (0: never, "
                    "only at a budget stop)")
    ap.add_argument("--checkpoint-minutes", type=float, default=10.0, help="... and at least every M minutes")
    ap.add_argument("--resume", action="store_true", help="require the state file of a run with the same arguments "
                    "(without: resume from it when there is one, else start afresh)")
    ap.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # stop after N steps of this invocation (tests)
    ap.add_argument("--log-every", type=int, help="a log line every N steps (default: every epoch)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def check_arguments(args) -> None:
    for name in ("global_size", "local_size"):
        value = getattr(args, name)
        if value <= 0 or value % args.patch_size:
            raise InputValueError(f"--{name.replace('_', '-')} {value} must be a positive multiple of the patch size "
                                  f"{args.patch_size}")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(args, name)
        if not 0 < lo <= hi <= 1:
            raise InputValueError(f"--{name.replace('_', '-')} {lo:g} {hi:g}: expected two area fractions "
                                  f"0 < MIN <= MAX <= 1")
    if args.epochs < 1 or args.batch_size < 1 or args.n_local < 0 or (args.steps is not None and args.steps < 1):
        raise InputValueError("--epochs, --steps and --batch-size must be >= 1 and --n-local >= 0")


def multicrop_of(args) -> MultiCrop:
    """The multi-crop augmentation the arguments describe."""
    return MultiCrop(args.global_size, args.local_size, args.n_local, global_scale=tuple(args.global_scale),
                     local_scale=tuple(args.local_scale))


def write_loss_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def teacher_out_path(args) -> Path:
    out = Path(args.out)
    return Path(args.teacher_out) if args.teacher_out else out.with_name(f"{out.stem}_teacher.pth")


def run_key(args, paths) -> str:
    """What the result depends on (transfgu.io.fingerprint): the arguments that change it and the list of image
    files."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_KEY}
    config["images"] = [str(p) for p in paths]
    return fingerprint(config)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The index batches of one epoch: its permutation (dist.epoch_permutation, drawn from (seed, epoch) alone)
    cut into full batches (the rest dropped), so a resumed run sees the same batches without replaying the data."""
    perm = epoch_permutation(n, seed, epoch)
    return list(perm[: n // batch_size * batch_size].split(batch_size))


def resume(state_path: Path, key: str, trainer, required: bool) -> int:
    """The step to start from: the one of the state file of a run with this key (trainer and random generators
    restored from it), else 0 (a warning when the file is another run's); `required` (--resume): no state file, or
    another run's, is an InputValueError."""
    run = {"step": 0, "rng": None}
    if not state_path.is_file():
        if required:
            raise InputValueError(f"--resume: no state file {state_path}")
        return 0
    if not restart_from_checkpoint(state_path, run, key=key, trainer=trainer):
        if required:
            raise InputValueError(f"--resume: {state_path} is the state of a run with other arguments or images")
        log.warning("%s is the state of a run with other arguments or images: starting afresh", state_path)
        return 0
    restore_rng(run["rng"])
    return run["step"]


class Images:
    """Batches of uint8 images by index: from memory (`preload`, on the device) or decoded by a DataLoader."""

    def __init__(self, paths, size: int, device: torch.device, preload: bool, num_workers: int):
        self.dataset, self.device, self.num_workers = ImageFiles(paths, size), device, num_workers
        self.memory = None
        if preload:
            t0 = time.time()
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=256, num_workers=num_workers)
            self.memory = torch.cat([b["image"] for b in loader]).to(device)
            log.info("preloaded %d images (%.0f MB) on %s in %.1f s", len(self.dataset),
                     self.memory.numel() / 2 ** 20, device, time.time() - t0)

    def batches(self, index_batches):
        if self.memory is not None:
            for idx in index_batches:
                yield self.memory[to_device(idx, self.device)].float().div_(255)
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_batches, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield batch["image"].to(self.device, non_blocking=True).float().div_(255)


def run(args) -> dict:
    t_start = time.time()
    check_arguments(args)
    paths = collect_images(args.images)
    image_size = args.image_size or 2 * args.global_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    batch_size = min(args.batch_size, len(paths))
    steps_per_epoch = len(paths) // batch_size
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    if args.steps is not None:
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else (
            args.warmup_epochs * steps_per_epoch if args.warmup_epochs is not None else total // 10)
    else:
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else (
            args.warmup_epochs if args.warmup_epochs is not None else args.epochs // 10) * steps_per_epoch

    backbone = DinoViT(args.arch, args.patch_size)  # seeded above; trainable (build_backbone would freeze it)
    head = DINOHead(backbone.embed_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim)
    multicrop = multicrop_of(args)
    trainer = DINOTrainer(
        backbone, head, multicrop, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=args.lr,
        min_lr=args.min_lr, weight_decay=args.weight_decay, total_steps=total, warmup_steps=warmup_steps,
        weight_decay_end=args.weight_decay_end, momentum_teacher=args.momentum_teacher, clip_grad=args.clip_grad,
        freeze_last_layer=args.freeze_last_layer, warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp, warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
        generator=torch.Generator().manual_seed(args.seed), device=device, amp=args.amp, compile=args.compile,
        compile_backend=args.compile_backend)

    out = Path(args.out)
    state_path = out.with_name(out.name + ".state")
    key = run_key(args, paths)
    start = resume(state_path, key, trainer, args.resume)
    if start:
        log.info("resumed from %s at step %d of %d", state_path, start, total)

    n_params = sum(p.numel() for p in trainer.student.parameters())
    log.info("%d images at %d px, %s/%d + head (%d parameters) on %s; %d steps (%d per epoch) of %d images, "
             "%d crops per image (2 x %d px of %g-%g of the area + %d x %d px of %g-%g)%s%s", len(paths), image_size,
             args.arch, args.patch_size, n_params, device, total, steps_per_epoch, batch_size, multicrop.n_crops,
             args.global_size, *args.global_scale, args.n_local, args.local_size, *args.local_scale,
             ", bf16" if args.amp else "", ", compiled" if args.compile else "")
    images = Images(paths, image_size, device, args.preload, args.num_workers)

    def save_state(step: int) -> None:
        save_on_master(state_path, {"key": key, "step": step, "args": json.dumps(vars(args), default=str)},
                       trainer=trainer)

    log_every = args.log_every or steps_per_epoch
    budget = args.minutes * 60 if args.minutes is not None else None
    t_train = time.time()
    t_saved, t_window, n_window = t_train, t_train, 0
    step, stopped_by = start, "steps"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bar = None
    if not args.no_progress and sys.stderr.isatty():  # else the log lines (--log-every) show the progress
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="dino", unit="step", leave=False)
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        index_batches = epoch_batches(len(paths), batch_size, args.seed, epoch)[offset:]
        stop = False
        for x in images.batches(index_batches):
            t0 = time.time()
            loss = trainer.train_step(x, step)
            step += 1
            sync()
            now = time.time()
            trainer.history[-1]["images_per_s"] = round(len(x) / max(now - t0, 1e-9), 1)
            n_window += len(x)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % log_every == 0 or step == total:
                print(f"step {step}/{total} (epoch {epoch + 1}/{epochs}): loss {loss:.4f} "
                      f"(lr {trainer.history[-1]['lr']:.2e}, {n_window / (now - t_window):.0f} images/s, "
                      f"{now - t_train:.0f} s)", flush=True)
                t_window, n_window = now, 0
            if budget is not None and now - t_start >= budget and step < total:
                stopped_by, stop = "minutes", True
            elif args.stop_after is not None and step - start >= args.stop_after and step < total:
                stopped_by, stop = "stop_after", True
            if stop or step == total:
                break
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or \
                    now - t_saved >= args.checkpoint_minutes * 60:
                save_state(step)
                t_saved = time.time()
        if stop:
            break
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    if step < total:
        save_state(step)
        log.warning("stopped by %s after step %d of %d: the schedules stopped part-way (lr %.2e, momentum %.5f); "
                    "run the same command again to resume from %s", "--minutes" if stopped_by == "minutes" else
                    "--stop-after", step, total, trainer.history[-1]["lr"], trainer.history[-1]["momentum"],
                    state_path)

    extra = {"args": vars(args), "epoch": step / steps_per_epoch, "steps_done": step, "steps_planned": total}
    save_dino_checkpoint(out, trainer.teacher["backbone"], trainer.student["backbone"], trainer.teacher["head"],
                         trainer.student["head"], extra=extra)
    teacher_out = teacher_out_path(args)
    save_dino_checkpoint(teacher_out, trainer.teacher["backbone"], extra={"steps_done": step, "steps_planned": total})
    curve = out.with_name(out.name + ".loss.csv")
    write_loss_csv(curve, trainer.history)
    if step == total and state_path.exists():
        state_path.unlink()
    done_here = step - start
    losses = [r["loss"] for r in trainer.history]
    head_n = max(1, min(50, len(losses) // 5))  # the first and last fifth, at most 50 steps each
    summary = {
        "out": str(out), "teacher_out": str(teacher_out), "teacher_mb": round(teacher_out.stat().st_size / 2 ** 20, 2),
        "steps_planned": total, "steps_done": step, "steps_this_run": done_here, "resumed_from": start,
        "completed": step == total, "stopped_by": stopped_by if step < total else "steps", "epochs": step / steps_per_epoch,
        "images": len(paths), "batch_size": batch_size, "device": str(device), "amp": args.amp, "compile": args.compile,
        "images_per_s": round(done_here * batch_size / max(train_s, 1e-9), 1),
        "loss_first": round(float(np.mean(losses[:head_n])), 4), "loss_last": round(float(np.mean(losses[-head_n:])), 4),
        "lr_last": trainer.history[-1]["lr"], "momentum_last": trainer.history[-1]["momentum"],
        "train_s": round(train_s, 1), "wall_s": round(time.time() - t_start, 1)}
    with atomic_output(out.with_name(out.name + ".summary.json")) as tmp:
        Path(tmp).write_text(json.dumps(summary) + "\n")
    print(f"wrote {out}, {teacher_out} and {curve}; {step}/{total} steps, {summary['images_per_s']} images/s, "
          f"training {train_s:.1f} s, total wall time {time.time() - t_start:.1f} s", flush=True)
    print("summary " + json.dumps(summary), flush=True)
    return summary


def main(argv=None) -> None:
    """`python -m transfgu.pretrain ...`: the same as `transfgu pretrain ...`."""
    from .cli import main as cli_main
    cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
