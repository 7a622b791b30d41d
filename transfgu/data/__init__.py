"""Datasets: which (dataset, granularity) pairs exist, their label maps, split indexes and image loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..pseudo import assemble_pseudo_masks
from . import synthetic

from . import adapters, labels
from .labels import INVALID


@dataclass(frozen=True)
class Task:
    """A dataset at one granularity: how many concepts to discover and how raw labels map to classes."""
    dataset: str
    granularity: int
    n_things: int
    n_stuff: int
    things_only: bool
    class_names: tuple
    label_lut: np.ndarray | None = field(repr=False, default=None)  # raw value -> class, IGNORE, INVALID
    class_kinds: tuple = ()  # per class 'thing' / 'stuff' / 'background'; empty where the data does not say

    @property
    def n_concepts(self) -> int:
        return self.n_things + self.n_stuff

    @property
    def n_outputs(self) -> int:
        """Decoder channels: one per concept, plus channel 0 = background for things-only data."""
        return self.n_concepts + int(self.things_only)


def _synthetic_classes(granularity: int, things_only: bool):
    fine = np.arange(len(synthetic.FINE_CLASS_NAMES))
    coarse = granularity in (6, 4)
    cls = fine // 2 if coarse else fine
    names = list(synthetic.COARSE_CLASS_NAMES if coarse else synthetic.FINE_CLASS_NAMES)
    if things_only:
        cls = np.where(fine < synthetic.NUM_THING_KINDS, cls + 1, 0)
        names = ["background"] + names[: (3 if coarse else 6)]
    return names, labels.lut_from(dict(zip(fine.tolist(), cls.tolist())))


@dataclass(frozen=True)
class DatasetSpec:
    things_only: bool
    granularities: dict          # granularity -> (K_t, K_s)
    pseudo_batch: int            # batch of the published pseudo-mask command (the gradient scale is 1 / it)
    classes: object              # granularity -> (class names, label lut)
    lister: object               # (root, split) -> entries
    section: str                 # README section


DATASETS = {
    "synthetic": DatasetSpec(False, {6: (3, 3), 12: (6, 6)}, 8, lambda g: _synthetic_classes(g, False),
                             adapters.synthetic, "The built-in synthetic dataset"),
    "synthetic-things": DatasetSpec(True, {4: (3, 0), 7: (6, 0)}, 8, lambda g: _synthetic_classes(g, True),
                                    adapters.synthetic, "The built-in synthetic dataset"),
    "cocostuff": DatasetSpec(False, {27: (12, 15), 171: (80, 91)}, 8,
                             lambda g: labels.coco_stuff_27() if g == 27 else labels.coco_stuff_171(),
                             adapters.coco, "COCO-Stuff and COCO-80"),
    "coco80": DatasetSpec(True, {80: (80, 0)}, 8, lambda g: labels.coco_80(), adapters.coco,
                          "COCO-Stuff and COCO-80"),
    "cityscapes": DatasetSpec(True, {27: (27, 0)}, 2, lambda g: labels.cityscapes_27(), adapters.cityscapes,
                              "Cityscapes"),
    "voc": DatasetSpec(True, {21: (20, 0)}, 8, lambda g: labels.voc_21(), adapters.voc, "Pascal VOC"),
    "lip": DatasetSpec(True, {5: (5, 0), 16: (16, 0), 19: (19, 0)}, 2, labels.lip, adapters.lip, "LIP"),
}
FOLDER = "folder"


def valid_pairs() -> str:
    pairs = [f"{name}: granularity {sorted(spec.granularities)}" for name, spec in DATASETS.items()]
    return "; ".join(pairs + [f"{FOLDER}: the number of classes in classes.yaml, or any granularity > "
                              "dataset.n_things without labels"])


def _folder_classes(cfg: dict):
    """(names, kinds) from <root>/classes.yaml, or None when the folder has none.

    classes.yaml: `classes: [{name: person, kind: thing}, {name: sky, kind: stuff}, ...]`; label PNG value
    i is class i, 255 is ignored. A class of kind `background` (at most one, and no stuff classes) makes
    the dataset things-only."""
    path = Path(cfg["root"]) / "classes.yaml"
    if not path.is_file():
        return None
    import yaml
    try:
        entries = yaml.safe_load(path.read_text())["classes"]
        names = [str(e["name"]) for e in entries]
        kinds = [str(e.get("kind", "thing")) for e in entries]
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: expected `classes: [{{name: ..., kind: thing|stuff|background}}, ...]` "
                         f"(README, 'Your own images'): {e}") from None
    bad = sorted(set(kinds) - {"thing", "stuff", "background"})
    if bad or kinds.count("background") > 1 or ("background" in kinds and "stuff" in kinds):
        raise ValueError(f"{path}: kinds must be thing / stuff / background, with at most one background "
                         f"class and then no stuff classes; got {kinds}")
    return names, kinds


def things_only(cfg: dict) -> bool:
    """Whether the dataset of params `dataset` is things-only (decided by the dataset, not the granularity)."""
    name = cfg["name"]
    if name in DATASETS:
        return DATASETS[name].things_only
    if name == FOLDER:
        classes = _folder_classes(cfg)
        return "background" in classes[1] if classes else bool(cfg.get("things_only", False))
    raise ValueError(f"dataset.name: unknown dataset '{name}'. Valid: {valid_pairs()}")


def resolve_task(cfg: dict, granularity: int) -> Task:
    """The Task for params `dataset` at a granularity, or a ValueError listing the valid values."""
    name = cfg["name"]
    if name == FOLDER:
        return _folder_task(cfg, granularity)
    if name not in DATASETS:
        raise ValueError(f"dataset.name: unknown dataset '{name}'. Valid: {valid_pairs()}")
    spec = DATASETS[name]
    if granularity not in spec.granularities:
        raise ValueError(f"granularity: {granularity} is not valid for dataset '{name}'. Valid: {valid_pairs()}")
    n_things, n_stuff = spec.granularities[granularity]
    names, lut = spec.classes(granularity)
    # Things first, then stuff (COCO-Stuff, synthetic); things-only sets with a background class put it first
    # (VOC, COCO-80, LIP); Cityscapes' 27 classes are all concepts of a things-only run: not split.
    if not spec.things_only:
        kinds = ("thing",) * n_things + ("stuff",) * n_stuff
    elif names[0] == "background":
        kinds = ("background",) + ("thing",) * (len(names) - 1)
    else:
        kinds = ()
    return Task(name, granularity, n_things, n_stuff, spec.things_only, tuple(names), lut, kinds)


def _folder_task(cfg: dict, granularity: int) -> Task:
    classes = _folder_classes(cfg)
    if classes is not None:
        names, kinds = classes
        n_things, n_stuff = kinds.count("thing"), kinds.count("stuff")
        if granularity != n_things + n_stuff:
            raise ValueError(f"granularity: {granularity} does not match {Path(cfg['root']) / 'classes.yaml'}, "
                             f"which lists {n_things} thing and {n_stuff} stuff classes: use granularity "
                             f"{n_things + n_stuff}")
        order = list(range(len(names)))
        if "background" in kinds:  # background first, as the decoder's channel 0
            bg = kinds.index("background")
            order = [bg] + [i for i in order if i != bg]
        lut = labels.lut_from({raw: order.index(raw) for raw in range(len(names))})
        return Task(FOLDER, granularity, n_things, n_stuff, "background" in kinds,
                    tuple(names[i] for i in order), lut, tuple(kinds[i] for i in order))
    if (Path(cfg["root"]) / "labels").is_dir():
        raise ValueError(f"{Path(cfg['root']) / 'labels'} exists but {Path(cfg['root']) / 'classes.yaml'} does "
                         f"not: labels need the class list (README, 'Your own images')")
    only = bool(cfg.get("things_only", False))
    n_things = granularity if only else int(cfg.get("n_things") or 0)
    if n_things < 1 or n_things > granularity or (not only and n_things == granularity):
        raise ValueError(f"granularity / dataset.n_things: a folder without classes.yaml needs 1 <= "
                         f"dataset.n_things < granularity (or dataset.things_only: true); got n_things="
                         f"{cfg.get('n_things')}, granularity={granularity}")
    n_stuff = granularity - n_things
    names = (["background"] if only else []) + [f"thing {i}" for i in range(n_things)] + \
        [f"stuff {i}" for i in range(n_stuff)]
    return Task(FOLDER, granularity, n_things, n_stuff, only, tuple(names), None)


def published_pseudo_batch(name: str) -> int:
    return DATASETS[name].pseudo_batch if name in DATASETS else 8


def list_split(cfg: dict, split: str) -> list[dict]:
    root = Path(cfg["root"])
    name = cfg["name"]
    lister = adapters.folder if name == FOLDER else DATASETS[name].lister
    entries = lister(root, split)
    image_list = (cfg.get("image_list") or {}).get(split)
    if image_list:
        entries = adapters.select_listed(entries, adapters.read_image_list(image_list))
    if not entries:
        raise FileNotFoundError(f"no {split} images found for dataset '{name}' under {root} "
                                f"(README, 'Data layout')")
    return entries


def prepare_index(cfg: dict, seed: int, check_images: bool = False, num_workers: int = 0) -> dict:
    """Make the dataset ready (the synthetic one is generated under root) and list its splits:
    {"dataset", "root", "splits": {split: [{"id", "image", "label"}]}, "skipped": {split: [...]}}, paths
    relative to root. With check_images, every image is decoded and unreadable ones are left out."""
    root = Path(cfg["root"])
    name = cfg["name"]
    if name in ("synthetic", "synthetic-things"):
        s = cfg.get("synthetic", {})
        synthetic.write_synthetic_dataset(root, s["n_train"], s["n_val"], s["size"], seed)
    elif name not in DATASETS and name != FOLDER:
        raise ValueError(f"dataset.name: unknown dataset '{name}'. Valid: {valid_pairs()}")
    splits, skipped = {}, {}
    for split in ("train", "val"):
        entries = list_split(cfg, split)
        if check_images:
            bad = find_unreadable(root, entries, num_workers)
            skipped[split] = sorted(bad)
            entries = [e for e in entries if e["image"] not in bad]
        splits[split] = entries
    return {"dataset": name, "root": str(root), "splits": splits, "skipped": skipped}


def _check(path: Path):
    try:
        load_rgb(path, 8)
        return None
    except OSError as e:
        return str(e)


def find_unreadable(root: Path, entries: list[dict], num_workers: int = 0) -> dict:
    """{relative image path: reason} for the images that cannot be decoded."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    paths = [root / e["image"] for e in entries]
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:
        results = list(tqdm(pool.map(_check, paths), total=len(paths), desc="checking images", leave=False))
    return {e["image"]: r for e, r in zip(entries, results) if r is not None}


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit grayscale are rescaled by their type's range, palette
    and RGBA images converted (alpha dropped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im)
        im = Image.fromarray(np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_rgb(path: Path, size: int) -> torch.Tensor:
    """An image file as uint8 (3, size, size), resized bilinearly (aspect not kept)."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im).resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def load_label(path: Path, size: int, lut: np.ndarray) -> torch.Tensor:
    """A label PNG (8 or 16 bit, gray or palette indices) mapped through lut and resized (nearest) to
    (size, size), int64. A value the dataset never uses is an error naming the file and the value."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise OSError(f"label maps must be single-channel (L, P or 16-bit), got mode {im.mode}")
            raw = np.asarray(im.resize((size, size), Image.NEAREST)).astype(np.int64)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise OSError(f"cannot read label {path}: {e}") from e
    if raw.min() < 0 or raw.max() >= len(lut):
        raise ValueError(f"{path}: label value {int(raw.min() if raw.min() < 0 else raw.max())} is outside "
                         f"the dataset's label map")
    mapped = lut[raw]
    if (mapped == INVALID).any():
        value = int(raw[mapped == INVALID][0])
        raise ValueError(f"{path}: label value {value} is not a class of this dataset (nor an ignore value)")
    return torch.from_numpy(mapped.astype(np.int64))


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
