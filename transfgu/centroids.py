"""The concept centroids file (outputs/centroids.npz): `centroids` (K, D) float32, things first, then
`n_things` and `n_stuff`. The cluster stage writes it, the pseudo stage reads it; this module owns its layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputFileNotFound, InputValueError
from .io import atomic_output


def write_centroids(path: str | Path, centroids: np.ndarray, n_things: int, n_stuff: int) -> None:
    """Write the centroids (things first) and their split into things and stuff, atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, centroids=centroids, n_things=n_things, n_stuff=n_stuff)


def read_centroids(path: str | Path, n_things: int, n_stuff: int, granularity: int | None = None) -> np.ndarray:
    """The (n_things + n_stuff, D) centroids of `path`, checked to hold that many things and stuff concepts
    (`granularity`: the task's, named in the error)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path} not found: run the cluster stage first (dvc repro)")
    with np.load(path) as stored:
        held = int(stored["n_things"]), int(stored["n_stuff"])
        if held != (n_things, n_stuff):
            needs = f"granularity {granularity} needs" if granularity else "the task needs"
            raise InputValueError(f"{path} holds {held[0]}+{held[1]} concepts, {needs} {n_things}+{n_stuff}: "
                                  "re-run cluster")
        return stored["centroids"]
