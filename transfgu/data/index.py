"""Split indexes: the images (and labels) of each split of a dataset, as `prepare` writes them to
outputs/index.json, and which splits are labelled."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputFileNotFound
from . import adapters, synthetic
from .file_hashes import file_hashes
from .images import unreadable
from .tasks import DATASETS, FOLDER, Task

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)


# Image lists shipped in the package (transfgu/data/lists/, package data), selected by name with dataset.image_list.
SHIPPED_LISTS = Path(__file__).resolve().parent / "lists"


def image_list_of(dataset: DatasetConfig, split: str) -> Path | None:
    """The list file restricting a split, from `dataset.image_list`: null (every image), a {train: path, val: path}
    mapping (null for a split = every image), or the name of a list set shipped for the dataset (`curated` for
    cocostuff; the config checked the name)."""
    value = dataset.image_list
    if isinstance(value, str):
        return SHIPPED_LISTS / DATASETS[dataset.name].image_lists[value][split]
    path = getattr(value, split) if value is not None else None
    return Path(path) if path else None


def list_split(dataset: DatasetConfig, split: str) -> list[dict]:
    root, name = Path(dataset.root), dataset.name
    lister = adapters.folder if name == FOLDER else DATASETS[name].lister
    entries = lister(root, split)
    image_list = image_list_of(dataset, split)
    if image_list is not None:
        listed = adapters.read_image_list(image_list)
        entries = adapters.select_listed(entries, listed)
        if len(entries) < len(set(listed)):
            log.warning("%s: %d of its %d ids are not among the %s images found under %s", image_list,
                        len(set(listed)) - len(entries), len(set(listed)), split, root)
    if not entries:
        raise InputFileNotFound(f"no {split} images found for dataset '{name}' under {root} "
                                f"(docs/usage.md, 'Data layout')")
    return entries


def prepare_index(dataset: DatasetConfig, seed: int, check_images: bool = False, num_workers: int = 0) -> dict:
    """Make the dataset ready (the synthetic one is generated under root) and list its splits:
    {"dataset", "splits": {split: [{"id", "image", "label"}]}, "skipped": {split: [...]}, "fingerprint"}, paths
    relative to `dataset.root`, which the index does not record (readers take it from params.yaml: the same
    files at another root give the same index). With check_images, every image is decoded and unreadable ones
    are left out; `num_workers` threads decode them and hash new files."""
    root = Path(dataset.root)
    if dataset.synthetic is not None and dataset.name in ("synthetic", "synthetic-things"):
        s = dataset.synthetic
        synthetic.write_synthetic_dataset(root, s.n_train, s.n_val, s.size, seed)
    splits, skipped = {}, {}
    for split in ("train", "val"):
        entries = list_split(dataset, split)
        if check_images:
            bad = find_unreadable(root, entries, num_workers)
            skipped[split] = sorted(bad)
            entries = [e for e in entries if e["image"] not in bad]
        splits[split] = entries
    return {"dataset": dataset.name, "splits": splits, "skipped": skipped,
            "fingerprint": dataset_fingerprint(dataset, splits, num_workers)}


def dataset_fingerprint(dataset: DatasetConfig, splits: dict, num_workers: int = 0) -> dict:
    """What the index records of the files the pipeline reads, so that any change to them changes the index
    (and DVC re-runs what depends on it): the path relative to the root and the content hash of every listed
    image and label file, and the content of classes.yaml and of the image-list files. Where the dataset lives
    and when its files were written are not part of it: a copy at another root, with other modification times,
    gives the same index. The hashes come from a cache kept by stat (transfgu.data.file_hashes): a file is read
    only when it is new or its size, modification time or inode changed, so an unchanged dataset costs a stat
    per file (COCO's 246k files: seconds)."""
    root = Path(dataset.root)
    rels = [rel for split in sorted(splits) for e in splits[split] for rel in (e["image"], e.get("label")) if rel]
    hashes = file_hashes([root / rel for rel in rels], num_workers)
    digest, n_bytes = hashlib.sha256(), 0
    for rel, h in zip(rels, hashes):
        digest.update(f"{rel}\0{h}\n".encode())
        n_bytes += os.stat(root / rel).st_size
    n_files = len(rels)
    for path in [root / "classes.yaml"] + [image_list_of(dataset, split) for split in ("train", "val")]:
        if path is not None and path.is_file():
            digest.update(f"{path.name}\0".encode() + path.read_bytes())
    return {"files": n_files, "bytes": n_bytes, "sha256": digest.hexdigest()}


def find_unreadable(root: Path, entries: list[dict], num_workers: int = 0) -> dict:
    """{relative image path: reason} for the images that cannot be decoded."""
    from concurrent.futures import ThreadPoolExecutor
    from ..progress import progress
    paths = [root / e["image"] for e in entries]
    with ThreadPoolExecutor(max(num_workers, 1)) as pool:
        results = list(progress(pool.map(unreadable, paths), total=len(paths), desc="checking images", leave=False))
    return {e["image"]: r for e, r in zip(entries, results) if r is not None}


def split_is_labelled(index: dict, split: str, task: Task) -> bool:
    """Whether every image of a split has a label file and the task can read labels."""
    return task.label_lut is not None and all(e.get("label") for e in index["splits"][split])
