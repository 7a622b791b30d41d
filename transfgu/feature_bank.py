"""The crop feature bank (outputs/feature_bank.h5): the one module that writes and reads it.

Layout: for each group g of `thing` / `stuff` (things only: `thing`), `g/features` (M_g, D) float16, the
final [CLS] token of every selected crop, image by image in window order; `g/counts` (N,) crops per
image and `g/offsets` (N + 1,) their start rows; `image_ids` (N,); attributes R, arch, patch_size,
window_sizes, things_only (docs/method.md section 1)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import InputFileNotFound, InputValueError
from .io import atomic_output, write_image_ids
from .pieces import merge_batches


def groups_of(things_only: bool) -> tuple:
    return ("thing",) if things_only else ("thing", "stuff")


def batch_arrays(groups, crops) -> dict:
    """One batch's piece rows from `crop_features`' per-image lists (one list per group)."""
    arrays = {}
    for group, feats in zip(groups, crops):
        arrays[f"{group}/features"] = torch.cat(feats).numpy().astype(np.float16)
        arrays[f"{group}/counts"] = np.array([len(f) for f in feats], dtype=np.int64)
    return arrays


def write_feature_bank(path: str | Path, piece_paths, groups, image_ids, attrs: dict) -> dict:
    """Assemble the extract stage's pieces (one per batch, in batch order) into the feature bank, atomically.
    Returns crops per group."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        counts = merge_batches(piece_paths, h5, {f"{g}/features": 1024 for g in groups},
                               [f"{g}/counts" for g in groups])
        for g in groups:
            h5.create_dataset(f"{g}/offsets", data=np.concatenate([[0], np.cumsum(counts[f"{g}/counts"])]),
                              track_times=False)
        write_image_ids(h5, image_ids)
        h5.attrs.update(**attrs)
    return {g: int(counts[f"{g}/counts"].sum()) for g in groups}


def read_features(path: str | Path, group: str) -> np.ndarray:
    """All crop vectors of a group as float32 (M, D). A clear error when the file or the group is missing."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path} not found: run the extract stage first (dvc repro)")
    with h5py.File(path, "r") as h5:
        if f"{group}/features" not in h5:
            raise InputValueError(f"{path} has no {group} crops: re-run extract for this dataset")
        return np.asarray(h5[f"{group}/features"][:], dtype=np.float32)  # no second copy when float32
