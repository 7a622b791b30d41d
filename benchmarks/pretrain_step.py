"""Throughput of one DINO pretraining step (`transfgu pretrain`) at several batch sizes, eager and
torch.compile'd.

    python benchmarks/pretrain_step.py                       # vit_mini/8, 64/32-px crops, 128-px scenes (GPU)
    python benchmarks/pretrain_step.py --quick               # tiny sizes on the CPU, well under a minute
    python benchmarks/pretrain_step.py --batches 256 1024 --compile

Prints one JSON line per configuration: batch, compile, img_per_s (whole steps: multi-crop augmentation on the
device, teacher and student forwards, loss, backward, clipping, AdamW, EMA, the loss read back once) and
augment_img_per_s (the multi-crop views alone). Images: synthetic scenes of the built-in generator, kept on the
device as the `--preload` option does.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from transfgu.data.synthetic import generate_scene
from transfgu.dino import DINOHead, DINOTrainer, MultiCrop
from transfgu.models.vit import DinoViT

SIZES = {"full": dict(arch="vit_mini", patch=8, image=128, global_size=64, local_size=32, n_local=4, out_dim=1024,
                      hidden=1024, bottleneck=256, images=1024, steps=20, batches=(256, 1024)),
         "quick": dict(arch="vit_mini", patch=8, image=32, global_size=16, local_size=8, n_local=2, out_dim=64,
                       hidden=64, bottleneck=32, images=16, steps=2, batches=(8,))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scenes(n: int, size: int, device) -> torch.Tensor:
    rng = np.random.default_rng(0)
    rgb = np.stack([generate_scene(rng, size)[0] for _ in range(n)])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous().to(device)


def trainer_for(s, device, amp: bool, compile: bool) -> DINOTrainer:
    torch.manual_seed(0)
    backbone = DinoViT(s["arch"], s["patch"])
    head = DINOHead(backbone.embed_dim, s["out_dim"], s["hidden"], s["bottleneck"])
    return DINOTrainer(backbone, head, MultiCrop(s["global_size"], s["local_size"], s["n_local"]), epochs=1,
                       steps_per_epoch=1000, total_steps=1000, warmup_steps=10, freeze_last_layer=0,
                       generator=torch.Generator().manual_seed(0), device=device, amp=amp, compile=compile)


def rate(step, batches, n_steps: int, device) -> float:
    for i in range(3):  # warm-up (and compilation)
        step(batches[i % len(batches)], i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(n_steps):
        step(batches[i % len(batches)], 3 + i)
    sync(device)
    return n_steps * len(batches[0]) / (time.perf_counter() - t0)


def measure(s, memory, batch: int, device, amp: bool, compile: bool, n_steps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    batches = [memory[torch.randint(len(memory), (batch,), generator=gen).to(device)].float().div_(255)
               for _ in range(4)]
    trainer = trainer_for(s, device, amp, compile)
    row = {"batch": batch, "compile": compile, "amp": amp, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "arch": f"{s['arch']}/{s['patch']}",
           "crops": f"2 x {s['global_size']} + {s['n_local']} x {s['local_size']} px"}
    row["img_per_s"] = round(rate(trainer.train_step, batches, n_steps, device), 1)
    row["augment_img_per_s"] = round(rate(lambda x, i: trainer.multicrop(x, trainer.generator), batches, n_steps,
                                          device), 1)
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke check)")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 256 1024; --quick: 8)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default: 20; --quick: 2)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd backbones")
    ap.add_argument("--device", help="default: cuda when available")
    args = ap.parse_args(argv)
    s = SIZES["quick" if args.quick else "full"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda"
    memory = scenes(s["images"], s["image"], device)
    for batch in args.batches or s["batches"]:
        for compile in (False, True) if args.compile else (False,):
            print(json.dumps(measure(s, memory, batch, device, amp, compile, args.steps or s["steps"])), flush=True)


if __name__ == "__main__":
    main()
