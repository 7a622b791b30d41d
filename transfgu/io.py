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


def write_batch(shard: h5py.File, batch: int, arrays: dict) -> None:
    """Store one batch's results (name -> array, first axis = rows) in a rank's shard file."""
    group = shard.create_group(f"batch{batch}")
    for name, a in arrays.items():
        group.create_dataset(name, data=np.asarray(a))


def merge_batches(shard_paths, n_batches: int, out: h5py.File, chunk_rows: dict, in_memory=(),
                  compressed=()) -> dict:
    """Concatenate every batch's arrays in batch order, batch b read from shard b % len(shard_paths).

    Arrays named in chunk_rows become datasets of `out` (chunked by that many rows, written in one pass
    with no timestamps, so the file is the same bytes whatever the number of shards; those named in
    `compressed` losslessly with byte shuffling + gzip level 1); those named in in_memory are returned as
    numpy arrays."""
    shards = [h5py.File(p, "r") for p in shard_paths]
    try:
        batch = lambda b: shards[b % len(shards)][f"batch{b}"]  # noqa: E731
        names = list(chunk_rows) + list(in_memory)
        rows = {n: sum(batch(b)[n].shape[0] for b in range(n_batches)) for n in names}
        first = {n: batch(0)[n] for n in names}
        datasets = {}
        for n, chunk in chunk_rows.items():
            shape = (rows[n], *first[n].shape[1:])
            chunks = (max(1, min(chunk, rows[n])), *first[n].shape[1:]) if rows[n] else None
            pack = dict(compression="gzip", compression_opts=1, shuffle=True) if n in compressed and chunks else {}
            datasets[n] = out.create_dataset(n, shape=shape, dtype=first[n].dtype, chunks=chunks, track_times=False,
                                             **pack)
        pos = dict.fromkeys(chunk_rows, 0)
        memory = {n: [] for n in in_memory}
        for b in range(n_batches):
            for n in chunk_rows:
                a = batch(b)[n][...]
                datasets[n][pos[n]:pos[n] + len(a)] = a
                pos[n] += len(a)
            for n in in_memory:
                memory[n].append(batch(b)[n][...])
        return {n: np.concatenate(v) if v else np.zeros((0,)) for n, v in memory.items()}
    finally:
        for f in shards:
            f.close()


def write_image_ids(h5: h5py.File, ids) -> None:
    h5.create_dataset("image_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype(), track_times=False)

