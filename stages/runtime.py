"""What the stages that run a network (extract, pseudo, train, evaluate) read from params.yaml: this process's
device, the backbone, the precision, DataLoader workers and the pseudo-mask gradient scale."""
from __future__ import annotations

import os

import torch

from common import log
from transfgu import dist
from transfgu.data.tasks import published_pseudo_batch
from transfgu.models.vit import build_backbone
from transfgu.precision import resolve_precision


def device() -> torch.device:
    """This process's device (cuda:LOCAL_RANK under torchrun on GPUs, else the CPU)."""
    return dist.local_device()


def backbone_of(params, dev) -> torch.nn.Module:
    b = params["backbone"]
    model = build_backbone(b["arch"], int(b["patch_size"]), b.get("checkpoint"), seed=int(params["seed"]))
    if not b.get("checkpoint"):
        if dist.is_main():
            log.warning("backbone %s/%d has RANDOM weights (backbone.checkpoint is empty): results are not "
                        "meaningful segmentations", b["arch"], b["patch_size"])
    else:
        log.info("backbone %s/%d loaded from %s", b["arch"], b["patch_size"], b["checkpoint"])
    return model.to(dev)


def precision_of(params, stage: str, dev, default: str = "auto") -> str:
    """'fp32' or 'bf16' from params[stage]['precision'] on this device (auto: bf16 on a GPU)."""
    try:
        return resolve_precision(params[stage].get("precision", default), dev, f"{stage}.precision")
    except ValueError as e:
        raise SystemExit(f"params.yaml: {e}") from None


def workers_of(params, stage: str) -> int:
    """DataLoader worker processes for a stage: params[stage]['num_workers'], where auto = none on the CPU
    (decoding would take the cores from the model) and min(8, CPUs per process) with a GPU."""
    value = params[stage].get("num_workers", "auto")
    if value == "auto":
        if device().type != "cuda":
            return 0
        return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SystemExit(f"params.yaml: {stage}.num_workers: expected 'auto' or an integer >= 0, got {value!r}")
    return value


def decode_of(params, stage: str) -> str:
    """Where a stage decodes the train images: params[stage]['decode'], `host` (PIL in the DataLoader workers,
    the default) or `device` (the workers only read the JPEG files; nvJPEG decodes them on the GPU, libjpeg on
    the CPU). The value is checked by stages/checks.py; a non-JPEG file is an error when the dataset is built."""
    return params[stage].get("decode", "host")


def grad_scale_of(params) -> float:
    value = params["pseudo"].get("grad_scale", "auto")
    if value == "auto":
        return 1.0 / published_pseudo_batch(params["dataset"]["name"])
    return float(value)
