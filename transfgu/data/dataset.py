"""The Dataset the stages read a split with: images at a fixed square size, labels and pseudo masks; images
decoded in the workers (`decode="host"`) or only read there and decoded on the device (`"device"`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from ..devices import to_device
from ..errors import InputOSError, InputValueError
from .images import JPEG_EXTENSIONS, decode_resize, load_label, load_rgb, read_bytes


class SplitDataset(torch.utils.data.Dataset):
    """Images of one split at a fixed square size, with labels (through the task's lut) and/or the
    per-image pseudo maps of a reader when given (`maps`). The index lists paths relative to the dataset's
    `root`, which comes from params.yaml (`dataset.root`), not from the index."""

    def __init__(self, index: dict, split: str, size: int, lut: np.ndarray | None = None, maps=None,
                 decode: str = "host", protocol: str = "transfgu", *, root: str | Path):
        self.root = Path(root)
        self.protocol = protocol  # how images and labels come to (size, size): transfgu.data.images.fit
        self.entries = index["splits"][split]
        self.size, self.lut = size, lut
        self.maps = maps  # maps[i] -> image i's pseudo maps (K, h, w), e.g. transfgu.pseudo_store.PseudoMaskReader
        if decode == "device" and protocol != "transfgu":
            raise InputValueError(f"decode: device resizes square only, not as protocol {protocol} (use decode: host)")
        if decode == "device":
            other = next((e["image"] for e in self.entries if not e["image"].lower().endswith(JPEG_EXTENSIONS)),
                         None)
            if other is not None:
                raise InputValueError(f"decode: device decodes JPEG files only, and {self.root / other} is not one "
                                      f"(use decode: host)")
        self.decode = decode

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """The DataLoader's collate_fn for this dataset: default_collate, except that the JPEG bytes of
        `decode="device"` (one length per file) stay a list."""
        if "jpeg" not in items[0]:
            return default_collate(items)
        batch = default_collate([{k: v for k, v in item.items() if k != "jpeg"} for item in items])
        batch["jpeg"] = [item["jpeg"] for item in items]
        return batch

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        e = self.entries[i]
        try:
            if self.decode == "device":  # only read here; `images_on` decodes the batch where it is used
                item = {"index": i, "jpeg": read_bytes(self.root / e["image"]), "jpeg_size": self.size}
            else:
                item = {"index": i, "image": load_rgb(self.root / e["image"], self.size, self.protocol)}
        except InputOSError as err:  # the split index lists it: prepare can leave such files out
            raise InputOSError(f"{err}; `dataset.skip_bad: true` makes prepare leave unreadable images out") from err
        if self.lut is not None and e.get("label"):
            item["label"] = load_label(self.root / e["label"], self.size, self.lut, self.protocol)
        if self.maps is not None:
            item["maps"] = self.maps[i]
        return item


def images_on(batch: dict, device) -> torch.Tensor:
    """The batch's images as uint8 (B, 3, S, S) on `device`: moved (decoded in the workers), or decoded there
    from their JPEG bytes (`decode="device"`) at the dataset's size."""
    if "jpeg" in batch:
        return decode_resize(batch["jpeg"], int(batch["jpeg_size"][0]), device)
    return to_device(batch["image"], device)
