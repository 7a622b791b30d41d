"""Datasets: which (dataset, granularity) pairs exist, their label maps, split indexes and image loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..pseudo import assemble_pseudo_masks
from . import synthetic

IGNORE = 255


@dataclass(frozen=True)
class Task:
    """A dataset at one granularity: how many concepts to discover and how raw labels map to classes."""
    dataset: str
    granularity: int
    n_things: int
    n_stuff: int
    things_only: bool
    class_names: tuple
    label_lut: np.ndarray = field(repr=False)  # (256,) raw label -> class id, IGNORE for unlabelled

    @property
    def n_concepts(self) -> int:
        return self.n_things + self.n_stuff

    @property
    def n_outputs(self) -> int:
        """Decoder channels: one per concept, plus channel 0 = background for things-only data."""
        return self.n_concepts + int(self.things_only)


def _synthetic_lut(granularity: int, things_only: bool) -> tuple[np.ndarray, tuple]:
    fine = np.arange(len(synthetic.FINE_CLASS_NAMES))
    n_fine_things = 6
    coarse = granularity in (6, 4)
    cls = fine // 2 if coarse else fine
    names = list(synthetic.COARSE_CLASS_NAMES if coarse else synthetic.FINE_CLASS_NAMES)
    if things_only:
        n_thing_classes = 3 if coarse else 6
        cls = np.where(fine < n_fine_things, cls + 1, 0)
        names = ["background"] + names[:n_thing_classes]
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[fine] = cls
    return lut, tuple(names)


# name -> (things_only, {granularity: (K_t, K_s)}, published pseudo-mask batch for the gradient scale)
DATASETS = {
    "synthetic": (False, {6: (3, 3), 12: (6, 6)}, 8),
    "synthetic-things": (True, {4: (3, 0), 7: (6, 0)}, 8),
}


def valid_pairs() -> str:
    return "; ".join(f"{name}: granularity {sorted(g)}" for name, (_, g, _) in DATASETS.items())


def resolve_task(dataset: str, granularity: int) -> Task:
    """The Task for a (dataset, granularity) pair, or a ValueError listing the valid pairs."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset.name: unknown dataset '{dataset}'. Valid: {valid_pairs()}")
    things_only, table, _ = DATASETS[dataset]
    if granularity not in table:
        raise ValueError(f"granularity: {granularity} is not valid for dataset '{dataset}'. "
                         f"Valid: {valid_pairs()}")
    n_things, n_stuff = table[granularity]
    lut, names = _synthetic_lut(granularity, things_only)
    return Task(dataset, granularity, n_things, n_stuff, things_only, names, lut)


def published_pseudo_batch(dataset: str) -> int:
    return DATASETS[dataset][2]


def is_things_only(dataset: str) -> bool:
    if dataset not in DATASETS:
        raise ValueError(f"dataset.name: unknown dataset '{dataset}'. Valid: {valid_pairs()}")
    return DATASETS[dataset][0]


def prepare_index(dataset: str, root: str | Path, seed: int, synthetic_cfg: dict) -> dict:
    """Make the dataset ready (the synthetic one is generated under root) and list its splits:
    {"dataset", "root", "splits": {split: [{"id", "image", "label"}]}} with paths relative to root."""
    root = Path(root)
    if dataset in ("synthetic", "synthetic-things"):
        synthetic.write_synthetic_dataset(root, synthetic_cfg["n_train"], synthetic_cfg["n_val"],
                                          synthetic_cfg["size"], seed)
    else:
        raise ValueError(f"dataset.name: unknown dataset '{dataset}'. Valid: {valid_pairs()}")
    splits = {}
    for split in ("train", "val"):
        images = sorted((root / "images" / split).glob("*.png"))
        if not images:
            raise FileNotFoundError(f"no images under {root / 'images' / split}")
        splits[split] = [{"id": p.stem, "image": f"images/{split}/{p.name}",
                          "label": f"labels/{split}/{p.stem}.png"} for p in images]
    return {"dataset": dataset, "root": str(root), "splits": splits}


def load_rgb(path: Path, size: int) -> torch.Tensor:
    """An image file as uint8 (3, size, size), resized bilinearly (aspect not kept)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def load_label(path: Path, size: int, lut: np.ndarray) -> torch.Tensor:
    """A label PNG mapped through lut and resized (nearest) to (size, size), int64."""
    try:
        with Image.open(path) as im:
            raw = np.asarray(im.resize((size, size), Image.NEAREST))
    except (OSError, UnidentifiedImageError) as e:
        raise OSError(f"cannot read label {path}: {e}") from e
    return torch.from_numpy(lut[raw].astype(np.int64))


def read_pseudo_masks(h5, i: int) -> torch.Tensor:
    """Image i's pseudo maps (K, h, w) float32 from the pseudo-mask HDF5 file (see stages/pseudo.py)."""
    a = torch.from_numpy(h5["attention"][i][None])
    q = torch.from_numpy(h5["gradient"][i][None].astype(np.float32))
    return assemble_pseudo_masks(a, q)[0]


class SplitDataset(torch.utils.data.Dataset):
    """Images of one split at a fixed square size, with labels (through the task's lut) and/or the
    per-image pseudo maps from an HDF5 file when asked."""

    def __init__(self, index: dict, split: str, size: int, lut: np.ndarray | None = None,
                 maps_path: str | Path | None = None):
        self.root = Path(index["root"])
        self.entries = index["splits"][split]
        self.size, self.lut, self.maps_path = size, lut, maps_path
        self._maps = None

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        item = {"index": i, "image": load_rgb(self.root / e["image"], self.size)}
        if self.lut is not None and e.get("label"):
            item["label"] = load_label(self.root / e["label"], self.size, self.lut)
        if self.maps_path is not None:
            if self._maps is None:  # opened lazily: one handle per DataLoader worker
                import h5py
                self._maps = h5py.File(self.maps_path, "r")
            item["maps"] = read_pseudo_masks(self._maps, i)
        return item
