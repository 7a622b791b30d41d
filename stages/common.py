"""Shared plumbing of every stage script: the artifact paths, setup (params, logging, seeds, process group), the
task, timing. The library under transfgu/ never reads params.yaml; the stage scripts do. The stages that run a
network also use runtime.py (device, backbone, precision, workers)."""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from transfgu import dist
from transfgu.data.tasks import dataset_is_things_only, resolve_task

# The artifacts (dvc.yaml's outs), relative to the project root:
OUT = Path("outputs")
INDEX = OUT / "index.json"                  # prepare  -> extract, pseudo, train, evaluate
FEATURE_BANK = OUT / "feature_bank.h5"      # extract  -> cluster          (transfgu/feature_bank.py)
CENTROIDS = OUT / "centroids.npz"           # cluster  -> pseudo
PSEUDO_MASKS = OUT / "pseudo_masks.h5"      # pseudo   -> train            (transfgu/pseudo_store.py)
PSEUDO_METRICS = OUT / "pseudo_metrics.json"  # pseudo: the pseudo masks' own scores (diagnostics)
DECODER = OUT / "decoder.pt"                # train    -> evaluate, transfgu predict
TRAIN_LOG = OUT / "train_log.csv"           # train: one row per epoch
TRAIN_LIVE = OUT / "dvclive"                # train: dvclive's metrics.json and plots, updated while it trains
METRICS = OUT / "metrics.json"              # evaluate: the headline (with eval_details.json, cluster_classes.json,
                                            # per_class_iou.csv, confusion*.csv, pictures/, predictions/)

log = logging.getLogger("transfgu")


def setup(stage: str) -> dict:
    """Join the torchrun process group if there is one, read params.yaml, configure logging and seeds,
    validate the dataset/granularity pair. Ranks other than 0 log warnings only and show no progress bars."""
    dist.init_from_env()
    tag = f"{stage} rank {dist.rank()}/{dist.world_size()}" if dist.world_size() > 1 else stage
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format=f"%(asctime)s [{tag}] %(message)s", datefmt="%H:%M:%S")
    params_path = Path(os.environ.get("TRANSFGU_PARAMS", "params.yaml"))
    if not params_path.is_file():
        raise SystemExit(f"{params_path} not found: run the stages from the project root")
    params = yaml.safe_load(params_path.read_text())
    try:
        dataset_is_things_only(params["dataset"])
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


@contextmanager
def timed(what: str):
    t0 = time.time()
    yield
    log.info("%s took %.1f s", what, time.time() - t0)


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20
    return path.stat().st_size / 2 ** 20
