"""Small I/O helpers: atomic outputs, JSON, and the HDF5 layouts of the feature bank and pseudo masks."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary sibling path; on success it is renamed to `path`, on error removed.
    Works for files and directories, so an interrupted stage never leaves an output that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


class FeatureBankWriter:
    """Appends per-image crop [CLS] features to an HDF5 file: for each group (`thing`, `stuff`) a
    `features` (N, D) float16 array and `offsets` (n_images + 1): image i owns rows offsets[i]:offsets[i+1]."""

    def __init__(self, h5: h5py.File, groups, dim: int):
        self.h5, self.dim = h5, dim
        self.offsets = {g: [0] for g in groups}
        for g in groups:
            h5.create_dataset(f"{g}/features", shape=(0, dim), maxshape=(None, dim), dtype="float16",
                              chunks=(1024, dim))

    def append(self, group: str, feats: np.ndarray):
        ds = self.h5[f"{group}/features"]
        n = ds.shape[0]
        ds.resize(n + len(feats), axis=0)
        ds[n:] = feats.astype(np.float16)
        self.offsets[group].append(n + len(feats))

    def close(self):
        for g, off in self.offsets.items():
            self.h5.create_dataset(f"{g}/offsets", data=np.asarray(off, dtype=np.int64))


def write_image_ids(h5: h5py.File, ids) -> None:
    h5.create_dataset("image_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())


def read_image_ids(h5: h5py.File) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in h5["image_ids"][:]]
