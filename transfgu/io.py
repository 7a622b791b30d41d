"""Small I/O helpers: atomic outputs (files and folders), JSON, and the image-id column of the HDF5 artifacts."""
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


def write_image_ids(h5: h5py.File, ids) -> None:
    h5.create_dataset("image_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype(), track_times=False)

