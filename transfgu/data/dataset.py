"""The Dataset the stages read a split with: images at a fixed square size, labels and pseudo masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .images import load_label, load_rgb


class SplitDataset(torch.utils.data.Dataset):
    """Images of one split at a fixed square size, with labels (through the task's lut) and/or the
    per-image pseudo maps of a reader when given (`maps`)."""

    def __init__(self, index: dict, split: str, size: int, lut: np.ndarray | None = None, maps=None):
        self.root = Path(index["root"])
        self.entries = index["splits"][split]
        self.size, self.lut = size, lut
        self.maps = maps  # maps[i] -> image i's pseudo maps (K, h, w), e.g. transfgu.pseudo_store.PseudoMaskReader

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        item = {"index": i, "image": load_rgb(self.root / e["image"], self.size)}
        if self.lut is not None and e.get("label"):
            item["label"] = load_label(self.root / e["label"], self.size, self.lut)
        if self.maps is not None:
            item["maps"] = self.maps[i]
        return item
