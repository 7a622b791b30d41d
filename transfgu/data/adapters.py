"""Where each dataset keeps its images and labels: one function per on-disk layout, listing a split as
entries {"id", "image", "label"} with paths relative to the dataset root (label None when absent)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputFileNotFound, InputValueError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def _require(path: Path, what: str, section: str) -> Path:
    if not path.exists():
        raise InputFileNotFound(f"{what} not found: expected {path} (docs/usage.md, 'Data layout' > {section})")
    return path


def read_image_list(path: str | Path) -> list[str]:
    """The first word of each line of a list file (blank lines and # comments skipped), without folders."""
    path = _require(Path(path), "image list file (dataset.image_list)", "Image lists")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            ids.append(Path(line.split()[0]).name)
    return ids


def select_listed(entries: list[dict], listed) -> list[dict]:
    """The entries named in a list: by id or by image file name (e.g. Cityscapes' *_leftImg8bit.png)."""
    listed = set(listed)
    return [e for e in entries if e["id"] in listed or Path(e["image"]).name in listed]


def coco(root: Path, split: str) -> list[dict]:
    """MSCOCO/images/{train2017,val2017}/*.jpg with stuffthingmaps annotations/{...}/*.png; only images with
    at least one object annotation in annotations/instances_{split}2017.json (as the original code)."""
    name = COCO_SPLITS[split]
    section = "COCO-Stuff and COCO-80"
    _require(root / "images" / name, "COCO image folder", section)
    _require(root / "annotations" / name, "COCO-Stuff label folder (stuffthingmaps)", section)
    instances = json.loads(_require(root / "annotations" / f"instances_{name}.json", "COCO instances file",
                                    section).read_text())
    annotated = {a["image_id"] for a in instances.get("annotations", [])}
    entries = []
    for im in sorted(instances["images"], key=lambda im: im["id"]):
        if im["id"] in annotated:
            stem = Path(im["file_name"]).stem
            entries.append({"id": stem, "image": f"images/{name}/{im['file_name']}",
                            "label": f"annotations/{name}/{stem}.png"})
    return entries


def cityscapes(root: Path, split: str) -> list[dict]:
    """Cityscapes/leftImg8bit/{split}/<city>/*_leftImg8bit.png with gtFine/{split}/<city>/*_gtFine_labelIds.png."""
    section = "Cityscapes"
    images = _require(root / "leftImg8bit" / split, "Cityscapes image folder", section)
    _require(root / "gtFine" / split, "Cityscapes gtFine folder", section)
    entries = []
    for p in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = p.name[: -len("_leftImg8bit.png")]
        entries.append({"id": stem, "image": str(p.relative_to(root)),
                        "label": f"gtFine/{split}/{p.parent.name}/{stem}_gtFine_labelIds.png"})
    return entries


def voc(root: Path, split: str) -> list[dict]:
    """PascalVOC/JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{split}.txt."""
    section = "Pascal VOC"
    ids = read_image_list(_require(root / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split list", section))
    _require(root / "JPEGImages", "VOC image folder", section)
    _require(root / "SegmentationClass", "VOC label folder", section)
    return [{"id": i, "image": f"JPEGImages/{i}.jpg", "label": f"SegmentationClass/{i}.png"} for i in ids]


def lip(root: Path, split: str) -> list[dict]:
    """LIP/{split}_images/<id>.jpg, {split}_segmentations/<id>.png, {split}_id.txt."""
    section = "LIP"
    ids = read_image_list(_require(root / f"{split}_id.txt", "LIP split list", section))
    _require(root / f"{split}_images", "LIP image folder", section)
    _require(root / f"{split}_segmentations", "LIP label folder", section)
    return [{"id": i, "image": f"{split}_images/{i}.jpg", "label": f"{split}_segmentations/{i}.png"} for i in ids]


POTSDAM_SPLITS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}


def potsdam(root: Path, split: str) -> list[dict]:
    """Potsdam as IIC prepared it and STEGO / HP distribute it (root = their `potsdam` folder):
    imgs/<id>.mat (key "img": 200 x 200 x 4 uint8, RGB + infrared), gt/<id>.mat (key "gt": 200 x 200 int32,
    classes 0..5), split lists labelled_train.txt (train) and labelled_test.txt (val), one id a line."""
    section = "Potsdam"
    ids = read_image_list(_require(root / POTSDAM_SPLITS[split], "Potsdam split list", section))
    _require(root / "imgs", "Potsdam image folder (imgs/*.mat)", section)
    _require(root / "gt", "Potsdam label folder (gt/*.mat)", section)
    return [{"id": i, "image": f"imgs/{i}.mat", "label": f"gt/{i}.mat"} for i in ids]


def folder(root: Path, split: str) -> list[dict]:
    """images/{split}/* with optional labels/{split}/<stem>.png: when labels/{split} exists, every image
    needs its label."""
    images = _require(root / "images" / split, "image folder", "Your own images")
    labelled = (root / "labels" / split).is_dir()
    entries, seen = [], {}
    for p in sorted(images.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in seen:
                raise InputValueError(f"{p} and {seen[p.stem]} have the same name stem '{p.stem}': image ids (and "
                                 f"their label files) must be unique")
            seen[p.stem] = p
            label = f"labels/{split}/{p.stem}.png"
            if labelled and not (root / label).is_file():
                raise InputFileNotFound(f"no label for {p}: expected {root / label} (docs/usage.md, 'Data layout' > "
                                        f"Your own images)")
            entries.append({"id": p.stem, "image": f"images/{split}/{p.name}", "label": label if labelled else None})
    return entries


def synthetic(root: Path, split: str) -> list[dict]:
    """The generated set: images/{split}/*.png, labels/{split}/*.png."""
    images = sorted((root / "images" / split).glob("*.png"))
    return [{"id": p.stem, "image": f"images/{split}/{p.name}", "label": f"labels/{split}/{p.stem}.png"}
            for p in images]
