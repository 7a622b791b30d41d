"""The pseudo-mask file (outputs/pseudo_masks.h5): the one module that writes, reads and checks it.

Layout, one row per train image in index order:
- `attention` (N, h, w) float32: the [CLS] attention to the patches, averaged over heads, divided by its max;
- `gradient` (N, K, h, w) float16: the kept part of relu(-G_k) for each concept (things first), zero where
  G_k > 0 (`transfgu.pseudo.pseudo_mask_parts`), one image per chunk, byte-shuffled and deflated;
- `image_ids` (N,) the image ids; attributes R, n_things, n_stuff, grad_scale.
Concept k's pseudo map is P_k = attention + gradient_k where gradient_k is non-zero, else 0
(`transfgu.pseudo.assemble_pseudo_masks`, docs/method.md section 3)."""
from __future__ import annotations

from pathlib import Path

import h5py
import torch

from .errors import InputFileNotFound, InputValueError
from .io import atomic_output, write_image_ids
from .pieces import merge_batches
from .pseudo import assemble_pseudo_masks

PACKED = ("gradient",)  # compressed by the piece writer's threads while the device computes the next batches


def batch_arrays(attention: torch.Tensor, gradient16: torch.Tensor) -> dict:
    """One batch's rows as its piece stores them: attention (B, h, w) and the float16 gradient term (B, K, h, w)."""
    return {"attention": attention.float().cpu().numpy(), "gradient": gradient16.cpu().numpy()}


def write_pseudo_masks(path: str | Path, piece_paths, image_ids, R: int, n_things: int, n_stuff: int,
                       grad_scale: float, gather=()) -> dict:
    """Assemble the pieces of the pseudo stage (one per batch, in batch order) into the pseudo-mask file,
    atomically. Returns the arrays named in `gather` (other per-batch results the pieces hold, e.g. the stage's
    confusion counts), concatenated in batch order."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        gathered = merge_batches(piece_paths, h5, {"attention": 1, "gradient": 1}, gather, compressed=["gradient"])
        write_image_ids(h5, image_ids)
        h5.attrs.update(R=R, n_things=n_things, n_stuff=n_stuff, grad_scale=grad_scale)
    return gathered


def read_pseudo_parts(h5: h5py.File, i: int) -> dict:
    """Image i's stored parts: attention (h, w) float32 and the gradient term (K, h, w) float16, as stored (half
    the bytes of the assembled float32 maps; `transfgu.pseudo.maps_on` assembles a batch of them on the device)."""
    return {"attention": torch.from_numpy(h5["attention"][i]), "gradient": torch.from_numpy(h5["gradient"][i])}


def read_pseudo_masks(h5: h5py.File, i: int) -> torch.Tensor:
    """Image i's pseudo maps (K, h, w) float32 from an open pseudo-mask file."""
    parts = read_pseudo_parts(h5, i)
    return assemble_pseudo_masks(parts["attention"][None], parts["gradient"][None])[0]


def check_pseudo_masks(path: str | Path, n_concepts: int, granularity: int) -> None:
    """A clear error when the file is missing or holds another number of maps than the task needs."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path} not found: run the pseudo stage first (dvc repro)")
    with h5py.File(path, "r") as h5:
        n_maps = h5["gradient"].shape[1]
    if n_maps != n_concepts:
        raise InputValueError(f"{path} has {n_maps} maps per image, granularity {granularity} needs {n_concepts}: "
                         f"re-run pseudo")


class PseudoMaskReader:
    """Per-image reads of a pseudo-mask file, opened lazily: one handle per DataLoader worker process. An item
    is the image's stored parts (`read_pseudo_parts`), not the assembled maps: the loader then decompresses
    only, and moves half the bytes; `transfgu.pseudo.maps_on` assembles the batch where it is used."""

    read = staticmethod(read_pseudo_parts)  # (open file, i) -> item

    def __init__(self, path: str | Path):
        self.path, self._h5 = Path(path), None

    def __getitem__(self, i: int):
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self.read(self._h5, i)

    def __getstate__(self):  # a DataLoader worker opens its own handle
        return {"path": self.path, "_h5": None}
