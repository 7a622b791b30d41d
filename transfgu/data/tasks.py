"""Which (dataset, granularity) pairs exist: the Task of each (concept counts K_t / K_s, class names, kinds
and the raw-label map) and the dataset registry (docs/method.md, "Datasets and granularities")."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputValueError
from . import adapters, labels, synthetic
from .classes import load_classes

if TYPE_CHECKING:
    from ..config import DatasetConfig


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
    section: str                 # its section of docs/usage.md, "Data layout"
    image_lists: dict = field(default_factory=dict)  # name -> {split: file under transfgu/data/lists/}, for dataset.image_list


DATASETS = {
    "synthetic": DatasetSpec(False, {6: (3, 3), 12: (6, 6)}, 8, lambda g: _synthetic_classes(g, False),
                             adapters.synthetic, "The built-in synthetic dataset"),
    "synthetic-things": DatasetSpec(True, {4: (3, 0), 7: (6, 0)}, 8, lambda g: _synthetic_classes(g, True),
                                    adapters.synthetic, "The built-in synthetic dataset"),
    "cocostuff": DatasetSpec(False, {27: (12, 15), 171: (80, 91)}, 8,
                             lambda g: labels.coco_stuff_27() if g == 27 else labels.coco_stuff_171(),
                             adapters.coco, "COCO-Stuff and COCO-80",
                             # the "curated" subset most later papers report (49,629 train / 2,175 val ids)
                             {"curated": {"train": "cocostuff_curated_train.txt",
                                          "val": "cocostuff_curated_val.txt"}}),
    "coco80": DatasetSpec(True, {80: (80, 0)}, 8, lambda g: labels.coco_80(), adapters.coco,
                          "COCO-Stuff and COCO-80"),
    "cityscapes": DatasetSpec(True, {27: (27, 0)}, 2, lambda g: labels.cityscapes_27(), adapters.cityscapes,
                              "Cityscapes"),
    "voc": DatasetSpec(True, {21: (20, 0)}, 8, lambda g: labels.voc_21(), adapters.voc, "Pascal VOC"),
    "lip": DatasetSpec(True, {5: (5, 0), 16: (16, 0), 19: (19, 0)}, 2, labels.lip, adapters.lip, "LIP"),
    # Potsdam (no published TransFGU setting): the 6 classes as 1 thing (cars) + 5 stuff, the 3 merged classes of
    # STEGO / HP as 3 stuff (docs/method.md, "Datasets and granularities")
    "potsdam": DatasetSpec(False, {6: (1, 5)}, 8, lambda g: labels.potsdam_6(), adapters.potsdam, "Potsdam"),
    "potsdam3": DatasetSpec(False, {3: (0, 3)}, 8, lambda g: labels.potsdam_3(), adapters.potsdam, "Potsdam"),
}
FOLDER = "folder"


def valid_pairs() -> str:
    pairs = [f"{name}: granularity {sorted(spec.granularities)}" for name, spec in DATASETS.items()]
    return "; ".join(pairs + [f"{FOLDER}: the number of classes in classes.yaml, or any granularity > "
                              "dataset.n_things without labels"])


def dataset_is_things_only(dataset: DatasetConfig) -> bool:
    """Whether a dataset is things-only (decided by the dataset, not the granularity)."""
    if dataset.name != FOLDER:
        return DATASETS[dataset.name].things_only
    classes = load_classes(dataset.root)
    return "background" in classes.kinds if classes else dataset.things_only


def resolve_task(dataset: DatasetConfig, granularity: int) -> Task:
    """The Task for a dataset at a granularity, or an InputValueError listing the valid values."""
    name = dataset.name
    if name == FOLDER:
        return _folder_task(dataset, granularity)
    spec = DATASETS[name]
    if granularity not in spec.granularities:
        raise InputValueError(f"granularity: {granularity} is not valid for dataset '{name}'. Valid: {valid_pairs()}")
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


def _folder_task(dataset: DatasetConfig, granularity: int) -> Task:
    root = Path(dataset.root)
    classes = load_classes(root)
    if classes is not None:
        names, kinds = classes.names, classes.kinds
        n_things, n_stuff = kinds.count("thing"), kinds.count("stuff")
        if granularity != n_things + n_stuff:
            raise InputValueError(f"granularity: {granularity} does not match {root / 'classes.yaml'}, "
                                  f"which lists {n_things} thing and {n_stuff} stuff classes: use "
                                  f"granularity {n_things + n_stuff}")
        order = list(range(len(names)))
        if "background" in kinds:  # background first, as the decoder's channel 0
            bg = kinds.index("background")
            order = [bg] + [i for i in order if i != bg]
        lut = labels.lut_from({raw: order.index(raw) for raw in range(len(names))})
        return Task(FOLDER, granularity, n_things, n_stuff, "background" in kinds,
                    tuple(names[i] for i in order), lut, tuple(kinds[i] for i in order))
    if (root / "labels").is_dir():
        raise InputValueError(f"{root / 'labels'} exists but {root / 'classes.yaml'} does not: labels need the "
                              f"class list (docs/usage.md, 'Your own images')")
    only = dataset.things_only
    n_things = granularity if only else dataset.n_things or 0
    if n_things < 1 or n_things > granularity or (not only and n_things == granularity):
        raise InputValueError(f"granularity / dataset.n_things: a folder without classes.yaml needs 1 <= "
                              f"dataset.n_things < granularity (or dataset.things_only: true); got n_things="
                              f"{dataset.n_things}, granularity={granularity}")
    n_stuff = granularity - n_things
    names = (["background"] if only else []) + [f"thing {i}" for i in range(n_things)] + \
        [f"stuff {i}" for i in range(n_stuff)]
    return Task(FOLDER, granularity, n_things, n_stuff, only, tuple(names), None)


def published_pseudo_batch(name: str) -> int:
    return DATASETS[name].pseudo_batch if name in DATASETS else 8
