"""Shared plumbing of every stage script: the artifact paths, setup (params, logging, seeds, process group), the
task, timing. The library under transfgu/ never reads params.yaml; the stage scripts do. The stages that run a
network also use runtime.py (device, backbone, precision, workers)."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

import transfgu
from checks import check_index, check_params
from transfgu import dist
from transfgu.data.tasks import resolve_task
from transfgu.errors import BadInput, InputFileNotFound, InputValueError
from transfgu.io import disk_error, fingerprint, is_disk_error, loaded_code

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

# The params each stage reads: dvc.yaml's `params` of the stage (tests/test_resume.py checks they agree). They
# key the work a stage keeps while it runs (`run_key`).
STAGE_PARAMS = {
    "extract": ("dataset.name", "dataset.R", "dataset.things_only", "backbone", "extract", "seed"),
    "pseudo": ("granularity", "dataset.name", "dataset.n_things", "dataset.things_only", "dataset.R", "backbone",
               "pseudo", "seed"),
    "train": ("granularity", "dataset.name", "dataset.n_things", "dataset.things_only", "dataset.R", "backbone",
              "train", "seed"),
    "evaluate": ("granularity", "dataset.name", "dataset.n_things", "dataset.things_only", "dataset.R", "backbone",
                 "evaluate", "seed"),
}


def read_params() -> tuple[dict, Path]:
    """params.yaml (or $TRANSFGU_PARAMS), checked against the schema (stages/checks.py)."""
    params_path = Path(os.environ.get("TRANSFGU_PARAMS", "params.yaml"))
    if not params_path.is_file():
        raise InputFileNotFound(f"{params_path} not found: run the stages from the project root")
    try:
        params = yaml.safe_load(params_path.read_text())
    except yaml.YAMLError as e:
        raise InputValueError(f"{params_path}: not valid YAML: {e}") from None
    check_params(params, params_path)
    return params, params_path


def setup(stage: str) -> dict:
    """Join the torchrun process group if there is one, read and check params.yaml (and, after prepare, that
    the split index suits it), configure logging and seeds. Ranks other than 0 log warnings only and show no
    progress bars."""
    dist.init_from_env()
    tag = f"{stage} rank {dist.rank()}/{dist.world_size()}" if dist.world_size() > 1 else stage
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format=f"%(asctime)s [{tag}] %(message)s", datefmt="%H:%M:%S")
    params, params_path = read_params()
    if stage != "prepare" and INDEX.is_file():
        check_index(params, json.loads(INDEX.read_text()), params_path, dist.world_size())
    seed = int(params["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return params


def run_key(stage: str, params: dict, inputs=(), **resolved) -> str:
    """The fingerprint of what a stage's results depend on (transfgu.io.fingerprint): the params it reads
    (STAGE_PARAMS), values resolved at run time (`resolved`, e.g. the precision and the device type), the input
    files (`inputs`: artifacts, the backbone checkpoint) and the code it has imported from the project. It names
    the folder of pieces (extract, pseudo, evaluate) or the checkpoint (train) an interrupted run resumes from:
    work done with other params, inputs or code is never reused. Rank 0's value on every rank."""
    config = {"stage": stage, **resolved}
    for key in STAGE_PARAMS[stage]:
        value = params
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        config[key] = value
    code = loaded_code(Path(transfgu.__file__).parent, Path(__file__).parent)
    checkpoint = (params.get("backbone") or {}).get("checkpoint")
    return dist.broadcast_object(fingerprint(config, [*inputs, checkpoint], code) if dist.is_main() else None)


def stage_main(main):
    """Run a stage's main so that expected bad input (transfgu.errors.BadInput, a SystemExit with a message, a
    write that failed for the disk's sake) ends the process with its one-line message and exit status 2, no
    traceback. The message also goes to $TRANSFGU_ERROR_FILE when set (launch.py
    repeats it after torchrun's own report). Any other exception keeps its traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (BadInput, OSError, SystemExit) as e:
            if isinstance(e, SystemExit):
                if not isinstance(e.code, str):  # sys.exit(n): a status, not a message
                    raise
            elif not isinstance(e, BadInput):
                if not is_disk_error(e):
                    raise
                e = disk_error(e.filename or "an output", e)  # a write outside atomic_output (e.g. a piece)
            message = f"error: {e.code if isinstance(e, SystemExit) else e}"
            print(message, file=sys.stderr, flush=True)
            if os.environ.get("TRANSFGU_ERROR_FILE"):
                with contextlib.suppress(OSError):
                    Path(os.environ["TRANSFGU_ERROR_FILE"]).write_text(message + "\n")
            sys.exit(2)
    return wrapper


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
