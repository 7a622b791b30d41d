"""Shared plumbing of the stage scripts: params, logging, device, task, backbone, index."""
from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transfgu import dist  # noqa: E402
from transfgu.dist import progress  # noqa: E402
from transfgu.io import ShardWriter  # noqa: E402
from transfgu.data import published_pseudo_batch, resolve_task, things_only  # noqa: E402
from transfgu.models.vit import build_backbone  # noqa: E402
from transfgu.precision import resolve_precision  # noqa: E402

OUT = Path("outputs")
INDEX = OUT / "index.json"
FEATURE_BANK = OUT / "feature_bank.h5"
CENTROIDS = OUT / "centroids.npz"
PSEUDO_MASKS = OUT / "pseudo_masks.h5"
PSEUDO_METRICS = OUT / "pseudo_metrics.json"
DECODER = OUT / "decoder.pt"
TRAIN_LOG = OUT / "train_log.csv"
METRICS = OUT / "metrics.json"

log = logging.getLogger("transfgu")


def setup(stage: str) -> dict:
    """Join the torchrun process group if there is one, read params.yaml, configure logging and seeds,
    validate the dataset/granularity pair. Ranks other than 0 log warnings only and show no progress bars."""
    global DEVICE
    DEVICE = dist.init_from_env()
    tag = f"{stage} rank {dist.rank()}/{dist.world_size()}" if dist.world_size() > 1 else stage
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format=f"%(asctime)s [{tag}] %(message)s", datefmt="%H:%M:%S")
    params_path = Path(os.environ.get("TRANSFGU_PARAMS", "params.yaml"))
    if not params_path.is_file():
        raise SystemExit(f"{params_path} not found: run the stages from the project root")
    params = yaml.safe_load(params_path.read_text())
    try:
        things_only(params["dataset"])
        resolve_task(params["dataset"], int(params["granularity"]))
    except ValueError as e:
        raise SystemExit(f"params.yaml: {e}") from None
    seed = int(params["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return params


def task_of(params):
    return resolve_task(params["dataset"], int(params["granularity"]))


DEVICE = None


def device() -> torch.device:
    """This process's device (cuda:LOCAL_RANK under torchrun on GPUs)."""
    return DEVICE or torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def grad_scale_of(params) -> float:
    value = params["pseudo"].get("grad_scale", "auto")
    if value == "auto":
        return 1.0 / published_pseudo_batch(params["dataset"]["name"])
    return float(value)


def my_loader(dataset, batch_size: int, num_workers: int):
    """This rank's share of the batches of a split, in order, as (global batch ids, DataLoader)."""
    mine = dist.my_batches(len(dataset), batch_size)
    return list(mine), torch.utils.data.DataLoader(dataset, batch_sampler=list(mine.values()),
                                                   num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                                   persistent_workers=num_workers > 0)


def shard_dir(final: Path) -> Path:
    """A folder shared by all ranks for their shards of `final` (stale ones from crashed runs removed)."""
    run_id = dist.broadcast_object(os.getpid())
    path = final.parent / f".{final.name}.shards-{run_id}"
    if dist.is_main():
        for old in final.parent.glob(f".{final.name}.shards-*"):
            shutil.rmtree(old)
        path.mkdir(parents=True)
    dist.barrier()
    return path


class BatchShards:
    """This rank's batches of a split (every world-th one) and the shard file their results go to, in a
    folder shared by all ranks; rank 0 then assembles the shards (transfgu.io.merge_batches)."""

    def __init__(self, final: Path, dataset, batch_size: int, num_workers: int, packed=()):
        self.dir, self.packed = shard_dir(final), packed
        self.n_batches = dist.n_batches(len(dataset), batch_size)
        self.ids, self.loader = my_loader(dataset, batch_size, num_workers)

    def batches(self, desc: str):
        """Yield (batch, save): save(arrays) stores that batch's results. Ends when every rank is done."""
        with ShardWriter(self.dir / f"rank{dist.rank()}.h5", self.packed) as shard:
            for b, batch in zip(self.ids, progress(self.loader, desc=desc)):
                yield batch, partial(shard.write, b)
        dist.barrier()

    def paths(self) -> list:
        return [self.dir / f"rank{r}.h5" for r in range(dist.world_size())]

    def remove(self):
        shutil.rmtree(self.dir)


@contextmanager
def timed(what: str):
    t0 = time.time()
    yield
    log.info("%s took %.1f s", what, time.time() - t0)


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20
    return path.stat().st_size / 2 ** 20
