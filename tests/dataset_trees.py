"""Tiny fixture trees in the on-disk formats of the real datasets (docs/usage.md, "Data layout"), for the dataset
adapter tests. Not a test module.

Every label map is a partition of the image into axis-aligned rectangles (a grid with random cut points),
each rectangle one raw label value; the image shows the same rectangles as blocks of colour (one colour per
raw value, plus a little noise), so the crop selection of the pipeline has some structure to work on.
The raw label arrays are kept in RAW_LABELS (absolute label path -> int64 array), so that tests can build
their expected maps without going through the reader under test. All randomness is a seeded numpy rng.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

RAW_LABELS: dict[str, np.ndarray] = {}

# (height, width) per image, in order: train images first, then val; the square ones allow label checks at
# their native size (load_label resizes to a square).
SIZES = [(40, 48), (48, 40), (40, 40), (36, 52), (44, 44), (48, 56), (52, 40), (40, 56), (56, 48)]

COCO_UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def raw_label(path) -> np.ndarray:
    """The raw values written to a fixture label file."""
    return RAW_LABELS[str(Path(path).resolve())]


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map (bit-interleaved), 256 x RGB flattened."""
    pal = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def grid_labels(rng, h: int, w: int, values, rows: int, cols: int) -> np.ndarray:
    """(h, w) int64 map of rows x cols rectangles (random cut points), filled with `values` row-major,
    cycling when there are fewer values than cells."""
    ys = [0, *np.sort(rng.choice(np.arange(2, h - 1), rows - 1, replace=False)).tolist(), h]
    xs = [0, *np.sort(rng.choice(np.arange(2, w - 1), cols - 1, replace=False)).tolist(), w]
    lab = np.empty((h, w), np.int64)
    k = 0
    for i in range(rows):
        for j in range(cols):
            lab[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = values[k % len(values)]
            k += 1
    return lab


def colour_image(rng, lab: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """RGB uint8 image: each label region in its value's colour, plus a little noise."""
    img = colours[lab].astype(np.int64) + rng.integers(-6, 7, size=lab.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_label(path: Path, lab: np.ndarray, mode: str = "L", palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(lab.astype(np.uint8), mode)
    if mode == "P":
        im.putpalette(palette)
    im.save(path)
    RAW_LABELS[str(path.resolve())] = lab.astype(np.int64).copy()


def _save_image(path: Path, img: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=95)
    else:
        im.save(path)


def _pools(rng, values, n_images: int, per_image: int) -> list[list[int]]:
    """Split a shuffled copy of `values` over n_images lists of per_image values (cycling), so that every
    value appears in some image."""
    order = list(rng.permutation(values))
    flat = [order[i % len(order)] for i in range(n_images * per_image)]
    return [[int(v) for v in flat[i * per_image:(i + 1) * per_image]] for i in range(n_images)]


def truncate(path, n_bytes: int = 100) -> Path:
    """Keep only the first n_bytes of a file (a truncated download)."""
    path = Path(path)
    data = path.read_bytes()[:n_bytes]
    path.write_bytes(data)
    return path


def write_list(path, ids) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


# -- COCO-Stuff / COCO-80 ---------------------------------------------------------------------------------
COCO_TRAIN_IDS = [139, 9, 285, 632, 724, 776, 785, 802, 872, 885]   # listed out of order in the JSON
COCO_VAL_IDS = [1000, 632]
COCO_UNANNOTATED = {"train": 5, "val": 25}                          # images with no object annotation


def make_coco(root, n_train: int = 3, n_val: int = 2, seed: int = 0) -> Path:
    """MSCOCO-like tree: images/{train2017,val2017}/<12-digit id>.jpg, stuffthingmaps
    annotations/{train2017,val2017}/<id>.png ('L', values 0..181 and 255), annotations/instances_*.json.

    Across its images the label maps use every PNG id 0..181 (unused thing ids included) and 255. One image
    per split is listed in instances_*.json with no annotation (its files exist): it must be left out."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(256, 3))
    split_ids = {"train": COCO_TRAIN_IDS[:n_train], "val": COCO_VAL_IDS[:n_val]}
    n_images = n_train + n_val
    rows, cols = 6, 8
    pools = _pools(rng, list(range(182)) + [255], n_images, rows * cols)
    k = j = 0
    for split, ids in split_ids.items():
        name = f"{split}2017"
        images, annotations = [], []
        for image_id in ids + [COCO_UNANNOTATED[split]]:
            h, w = SIZES[k % len(SIZES)]
            k += 1
            if image_id == COCO_UNANNOTATED[split]:
                values = rng.choice(182, rows * cols).tolist()
            else:
                values = pools[j]
                j += 1
            lab = grid_labels(rng, h, w, values, rows, cols)
            stem = f"{image_id:012d}"
            _save_image(root / "images" / name / f"{stem}.jpg", colour_image(rng, lab, colours))
            _save_label(root / "annotations" / name / f"{stem}.png", lab)
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w,
                           "license": 1, "coco_url": "", "date_captured": ""})
            if image_id != COCO_UNANNOTATED[split]:
                for cat in sorted({int(v) + 1 for v in np.unique(lab) if v < 91})[:2] or [1]:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                        "bbox": [0, 0, 4, 4], "area": 16.0, "iscrowd": 0,
                                        "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]})
        rng.shuffle(images)
        instances = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
                     "categories": [{"id": i + 1, "name": str(i)} for i in range(91)
                                    if i not in COCO_UNUSED_THING_IDS]}
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(instances))
    return root


# -- Cityscapes ----------------------------------------------------------------------------------------
CITYSCAPES_FILES = {"train": [("aachen", "aachen_000000_000000"), ("aachen", "aachen_000000_000001"),
                              ("bochum", "bochum_000000_000002")],
                    "val": [("frankfurt", "frankfurt_000000_000000"), ("lindau", "lindau_000000_000001")]}
CITYSCAPES_SIZES = [(32, 64), (24, 48), (40, 80), (32, 32), (36, 72)]


def make_cityscapes(root, seed: int = 1) -> Path:
    """leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png and gtFine/{train,val}/<city>/<stem>_gtFine_
    labelIds.png (values 0..33, all of them used), with gtFine colour maps beside them as distractors."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(256, 3))
    pools = _pools(rng, list(range(34)), 5, 4 * 5)
    k = 0
    for split, files in CITYSCAPES_FILES.items():
        for city, stem in files:
            h, w = CITYSCAPES_SIZES[k]
            lab = grid_labels(rng, h, w, pools[k], 4, 5)
            k += 1
            _save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                        colour_image(rng, lab, colours))
            gt = root / "gtFine" / split / city
            _save_label(gt / f"{stem}_gtFine_labelIds.png", lab)
            _save_image(gt / f"{stem}_gtFine_color.png", colours[lab].astype(np.uint8))
    return root


# -- Pascal VOC 2012 ------------------------------------------------------------------------------------
VOC_IDS = {"train": ["2007_000032", "2007_000039", "2007_000063"], "val": ["2007_000033", "2007_000042"]}


def _with_borders(lab: np.ndarray, value: int = 255) -> np.ndarray:
    """Mark 1-px borders between regions with `value`, as VOC outlines its objects."""
    out = lab.copy()
    edge = np.zeros(lab.shape, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    out[edge] = value
    return out


def make_voc(root, seed: int = 2) -> Path:
    """JPEGImages/<id>.jpg, SegmentationClass/<id>.png ('P' with the VOC palette, indices 0..20, 255 object
    borders), ImageSets/Segmentation/{train,val,trainval}.txt; plus a detection-only JPEG listed nowhere."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pal = voc_palette()
    colours = np.array(pal).reshape(256, 3)
    pools = _pools(rng, list(range(21)), 5, 3 * 4)
    k = 0
    for split, ids in VOC_IDS.items():
        for i in ids:
            h, w = SIZES[k]
            lab = _with_borders(grid_labels(rng, h, w, pools[k], 3, 4))
            k += 1
            _save_image(root / "JPEGImages" / f"{i}.jpg", colour_image(rng, lab, colours))
            _save_label(root / "SegmentationClass" / f"{i}.png", lab, "P", pal)
        write_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
    write_list(root / "ImageSets" / "Segmentation" / "trainval.txt", VOC_IDS["train"] + VOC_IDS["val"])
    _save_image(root / "JPEGImages" / "2008_000001.jpg", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    return root


# -- LIP ------------------------------------------------------------------------------------------------
LIP_IDS = {"train": ["100034_483681", "10005_205677", "100142_449784"], "val": ["100034_449202", "10008_222016"]}


def make_lip(root, seed: int = 3) -> Path:
    """{train,val}_images/<id>.jpg, {train,val}_segmentations/<id>.png ('L', values 0..19, all of them used),
    {train,val}_id.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(256, 3))
    pools = _pools(rng, list(range(20)), 5, 3 * 4)
    k = 0
    for split, ids in LIP_IDS.items():
        for i in ids:
            h, w = SIZES[k][::-1] if k % 2 else SIZES[k]  # LIP crops are mostly portrait
            lab = grid_labels(rng, h, w, pools[k], 3, 4)
            k += 1
            _save_image(root / f"{split}_images" / f"{i}.jpg", colour_image(rng, lab, colours))
            _save_label(root / f"{split}_segmentations" / f"{i}.png", lab)
        write_list(root / f"{split}_id.txt", ids)
    return root


# -- Potsdam (IIC's preparation, as STEGO and HP distribute it) ---------------------------------------------------
POTSDAM_IDS = {"labelled_train": ["5012", "77", "1930"], "labelled_test": ["8190", "346"],
               "unlabelled_train": ["2604", "11"]}
POTSDAM_SIZES = [(40, 40), (48, 48), (44, 44), (40, 40), (48, 48), (40, 40), (44, 44)]


def make_potsdam(root, seed: int = 5) -> Path:
    """imgs/<id>.mat (key "img": H x W x 4 uint8, RGB + infrared), gt/<id>.mat (key "gt": H x W int32, values
    0..5, all of them used) for the labelled ids, none for the unlabelled ones; labelled_train.txt,
    labelled_test.txt, unlabelled_train.txt and all.txt."""
    from scipy.io import savemat
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(256, 3))
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    pools = _pools(rng, list(range(6)), 5, 3 * 3)
    k = 0
    for split, ids in POTSDAM_IDS.items():
        for i in ids:
            h, w = POTSDAM_SIZES[k]
            lab = grid_labels(rng, h, w, pools[k % len(pools)], 3, 3)
            k += 1
            infrared = rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)
            savemat(root / "imgs" / f"{i}.mat", {"img": np.concatenate([colour_image(rng, lab, colours), infrared],
                                                                       axis=2)})
            if split != "unlabelled_train":
                path = root / "gt" / f"{i}.mat"
                savemat(path, {"gt": lab.astype(np.int32)})
                RAW_LABELS[str(path.resolve())] = lab.copy()
        write_list(root / f"{split}.txt", ids)
    write_list(root / "all.txt", [i for ids in POTSDAM_IDS.values() for i in ids])
    return root


# -- a plain folder of images ----------------------------------------------------------------------------
FOLDER_FILES = {"train": [("a_rgb", ".jpg", "RGB"), ("b_gray", ".png", "L"), ("c_rgba", ".png", "RGBA")],
                "val": [("d_palette", ".png", "P"), ("e_16bit", ".png", "I;16")]}
FOLDER_NAMES = {"thing": ["cat", "dog", "car", "cup"], "stuff": ["grass", "sky", "road", "wall"]}


def _in_mode(rgb: np.ndarray, lab: np.ndarray, mode: str, colours: np.ndarray) -> Image.Image:
    if mode == "RGB":
        return Image.fromarray(rgb)
    gray = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(np.uint8)
    if mode == "L":
        return Image.fromarray(gray, "L")
    if mode == "RGBA":
        alpha = np.full(lab.shape, 128, np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        im = Image.fromarray(lab.astype(np.uint8), "P")
        im.putpalette(colours.astype(np.uint8).ravel().tolist())
        return im
    if mode == "I;16":
        a = gray.astype(np.uint16) * 257
        a[lab == lab.max()] = 65535
        return Image.fromarray(a)  # uint16 -> 'I;16'
    raise ValueError(mode)


def make_folder(root, labels: bool = True, kinds=("thing", "thing", "stuff", "stuff"), seed: int = 4) -> Path:
    """images/{train,val}/* (.jpg and .png; RGB, grayscale 'L', 'RGBA', palette 'P' and 16-bit 'I;16'
    images) plus a non-image file; with labels, labels/{train,val}/<stem>.png ('L', values 0..len(kinds)-1
    and 255) and classes.yaml listing `kinds` (thing / stuff / background)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(256, 3))
    n = len(kinds)
    k = 0
    for split, files in FOLDER_FILES.items():
        for stem, ext, mode in files:
            h, w = SIZES[k]
            lab = grid_labels(rng, h, w, list(rng.permutation(n)) + [255], 3, 3)
            k += 1
            rgb = colour_image(rng, lab, colours)
            path = root / "images" / split / f"{stem}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            im = _in_mode(rgb, lab, mode, colours)
            if ext == ".jpg":
                im.save(path, quality=95)
            else:
                im.save(path)
            assert Image.open(path).mode == mode
            if labels:
                _save_label(root / "labels" / split / f"{stem}.png", lab)
        (root / "images" / split / "notes.txt").write_text("not an image\n")
    if labels:
        count = {"thing": 0, "stuff": 0}
        classes = []
        for kind in kinds:
            if kind == "background":
                classes.append({"name": "background", "kind": kind})
            else:
                classes.append({"name": FOLDER_NAMES[kind][count[kind]], "kind": kind})
                count[kind] += 1
        (root / "classes.yaml").write_text(yaml.safe_dump({"classes": classes}, sort_keys=False))
    return root


def dataset_cfg(name: str, root, **extra):
    """The typed `dataset` section (transfgu.config.DatasetConfig) for a fixture tree."""
    from transfgu.config import dataset_config
    return dataset_config({"name": name, "root": str(root), "R": 32, **extra})
