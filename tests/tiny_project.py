"""Helpers of the tests that run the stages on a tiny copy of the project: params merged over the defaults, the
code (with the shipped lists; for DVC, dvc.yaml) copied into a temporary folder."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def merge(base: dict, over: dict) -> dict:
    """`over` written into `base`, nested sections key by key; returns base."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def tiny_dag(n_train: int, n_val: int, size: int) -> dict:
    """params overrides for the smallest DAG run through dvc that still exercises every stage (R = 32, batches of 4,
    2 epochs with one hand-over) on `n_train` / `n_val` synthetic scenes of `size` px; a new dict each call."""
    return {
        "dataset": {"R": 32, "synthetic": {"n_train": n_train, "n_val": n_val, "size": size}},
        "extract": {"batch_size": 4, "crop_batch": 64},
        "cluster": {"niter": 20},
        "pseudo": {"batch_size": 4},
        "train": {"epochs": 2, "batch_size": 4, "bootstrap_start": 1, "bootstrap_intervals": [1]},
        "evaluate": {"batch_size": 4, "n_pictures": 2},
    }


def predict_files(folder: Path) -> None:
    """What `transfgu predict` reads, in `folder`: params.yaml (synthetic, R = 32, random vit_mini/8) and a seeded
    6-class decoder.pt."""
    import torch

    from transfgu.models.decoder import build_decoder

    params = default_params({"dataset": {"root": str(folder / "data"), "R": 32}})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    torch.save(build_decoder(6, 192, seed=1).state_dict(), folder / "decoder.pt")


def default_params(over: dict | None = None) -> dict:
    """The project's params.yaml with `over` merged in."""
    return merge(copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text())), over or {})


def copy_project(root: Path, params: dict | None = None, code=("stages", "transfgu")) -> Path:
    """The code (with the shipped image lists, package data) and dvc.yaml (which the stages read their files and
    params from) into `root`, params.yaml if given."""
    root = Path(root)
    for name in code:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if params is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run(args, cwd, check: bool = True, **env) -> subprocess.CompletedProcess:
    """A command in a temporary project, with this environment's python (and dvc) first on PATH, a git identity and
    no DVC analytics (`env` adds variables); asserts success unless check is False."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", **env)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_stage_here(name: str, *argv) -> None:
    """A stage script in this process, as `python stages/<name>.py ARGV` runs it, in the current folder (a project
    with params.yaml and dvc.yaml). An expected error raises SystemExit(2) after its one line on stderr. The torch
    state a stage sets for its process (grad mode, deterministic algorithms) is restored."""
    import runpy

    import torch
    state = (torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    saved = sys.argv
    sys.argv = [f"stages/{name}.py", *argv]
    try:
        runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = saved
        torch.set_grad_enabled(state[0])
        torch.use_deterministic_algorithms(state[1], warn_only=state[2])
