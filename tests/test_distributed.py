"""torchrun with 2 gloo processes against 1 process: the same feature bank and pseudo-mask bytes, the same
confusion matrix and metrics, the same decoder after 3 training steps; a failing rank ends the run."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tiny_project import copy_project, default_params

pytestmark = pytest.mark.slow  # the whole module spawns dvc / torchrun / bash processes

REPO = Path(__file__).resolve().parent.parent
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 12, "n_val": 6, "size": 64}},
        "extract": {"batch_size": 4, "crop_batch": 64}, "pseudo": {"batch_size": 4},
        "train": {"epochs": 1, "batch_size": 4, "bootstrap_start": 0, "dropout": 0.0},
        "evaluate": {"batch_size": 2, "n_pictures": 3}}


def stage(root, name, nproc=1, check=True):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launcher"]["nproc_per_node"] = nproc
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, f"stages/{name}.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{name} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    copy_project(root, default_params(TINY))
    for name in ("prepare", "extract", "cluster", "pseudo", "train", "evaluate"):
        stage(root, name)
    shutil.copytree(root / "outputs", root / "one")
    for name in ("extract", "pseudo", "train"):
        stage(root, name, nproc=2)
    shutil.copy(root / "outputs" / "decoder.pt", root / "two_decoder.pt")
    shutil.copy(root / "one" / "decoder.pt", root / "outputs" / "decoder.pt")  # evaluate the same decoder
    stage(root, "evaluate", nproc=2)
    return root


@pytest.mark.parametrize("name", ["feature_bank.h5", "pseudo_masks.h5", "pseudo_metrics.json"])
def test_sharded_stages_write_identical_files(runs, name):
    assert (runs / "outputs" / name).read_bytes() == (runs / "one" / name).read_bytes()
    assert not [p for p in (runs / "outputs").iterdir() if p.name.startswith(".")], "pieces or checkpoints left"


def test_sharded_evaluate_gives_identical_confusion_metrics_and_predictions(runs):
    for name in ("metrics.json", "eval_details.json", "cluster_classes.json", "confusion.csv", "per_class_iou.csv"):
        assert (runs / "outputs" / name).read_text() == (runs / "one" / name).read_text(), name
    one = sorted(p.name for p in (runs / "one" / "predictions").iterdir())
    two = sorted(p.name for p in (runs / "outputs" / "predictions").iterdir())
    assert one == two and len(one) == 6
    for n in one:
        assert (runs / "one" / "predictions" / n).read_bytes() == (runs / "outputs" / "predictions" / n).read_bytes()
    assert len(list((runs / "outputs" / "pictures").iterdir())) == 3
    assert json.loads((runs / "outputs" / "eval_details.json").read_text())["n_images"] == 6


def test_ddp_training_matches_one_process_after_three_steps(runs):
    """Same global batches (4 = 2 x 2), per-sample augmentation: the weights agree to rounding. Adam divides
    each gradient by its own magnitude, so an element whose gradient is ~0 can move by up to lr per step
    on rounding noise alone: all but a handful of the ~1M weights agree within 1e-5, and none differs by
    more than 3 steps x lr."""
    one = torch.load(runs / "one" / "decoder.pt", weights_only=True)
    two = torch.load(runs / "two_decoder.pt", weights_only=True)
    assert one.keys() == two.keys()
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    init = torch.cat([v.flatten() for v in one.values()])
    assert (diffs > 1e-5).sum() <= 10, f"{int((diffs > 1e-5).sum())} of {diffs.numel()} weights differ"
    assert diffs.max() <= 3 * 1e-4 + 1e-6
    assert diffs.numel() == init.numel() > 100_000
    log_one = (runs / "one" / "train_log.csv").read_text().splitlines()[1].split(",")
    log_two = (runs / "outputs" / "train_log.csv").read_text().splitlines()[1].split(",")
    np.testing.assert_allclose([float(v) for v in log_one[1:5]], [float(v) for v in log_two[1:5]], rtol=1e-5)


def test_a_failing_rank_ends_the_run_with_its_error(runs):
    """Image 4 is in batch 1, which rank 1 reads: its error (naming the file) ends both processes."""
    entries = json.loads((runs / "outputs" / "index.json").read_text())["splits"]["train"]
    bad = runs / "data" / "synthetic" / entries[4]["image"]
    saved = bad.read_bytes()
    try:
        bad.write_bytes(saved[:60])
        proc = stage(runs, "extract", nproc=2, check=False)
    finally:
        bad.write_bytes(saved)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "cannot read image" in text and entries[4]["image"].split("/")[-1] in text
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)", text, re.S), text[-2000:]
