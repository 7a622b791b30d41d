"""Dataset adapters (transfgu/data): label maps against the tables of docs/method.md ("Datasets and granularities"),
written out here independently of transfgu/data/labels.py, split listing, image decoding and bad input, on
tiny fixture trees in the on-disk formats of the real datasets (dataset_trees.py)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_trees as trees
from dataset_trees import dataset_cfg, raw_label
from transfgu.data.dataset import SplitDataset
from transfgu.data.images import load_label, load_rgb
from transfgu.data.index import list_split, prepare_index
from transfgu.data.tasks import dataset_is_things_only, resolve_task

# ---------------------------------------------------------------------------------------------------------
# docs/method.md, "Datasets and granularities", written out
# ---------------------------------------------------------------------------------------------------------
IGN, BAD = 255, -1          # ignored pixel / value the dataset never uses
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def span(a, b):
    return list(range(a, b + 1))


COCO27 = [  # class order of docs/method.md: things, then stuff
    ("electronic", span(71, 76)), ("appliance", span(77, 82)), ("food", span(51, 60)),
    ("furniture", span(61, 70)), ("indoor", span(83, 90)), ("kitchen", span(43, 50)),
    ("accessory", span(25, 32)), ("animal", span(15, 24)), ("outdoor", span(9, 14)), ("person", [0]),
    ("sports", span(33, 42)), ("vehicle", span(1, 8)),
    ("ceiling", [101, 102]), ("floor", [100, *span(113, 117)]), ("food-stuff", [120, 121, 152, 169]),
    ("furniture-stuff", [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164]),
    ("raw-material", [99, 131, 138, 142]),
    ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]), ("wall", span(170, 176)),
    ("window", [179, 180]), ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]), ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]), ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
]
LIP5 = [[1, 2, 4, 13], [5, 6, 7, 10, 11, 12], [3, 14, 15], [9, 16, 17], [8, 18, 19]]
# Potsdam gt values (IIC's preparation): 0 roads, 1 buildings, 2 low vegetation, 3 trees, 4 cars, 5 clutter.
# 6 classes: cars (the thing) first; 3 classes: STEGO's Potsdam.fine_to_coarse ({0, 4}, {1, 5}, {2, 3}).
POTSDAM6_CLASS_OF = {4: 0, 0: 1, 1: 2, 2: 3, 3: 4, 5: 5}
POTSDAM3_CLASS_OF = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def expected_table(name: str, granularity: int) -> tuple[np.ndarray, np.ndarray]:
    """(table, checked): the class of each raw value 0..255 (IGN ignored, BAD never used), and which raw
    values docs/method.md pins down (LIP says nothing about 255)."""
    t = np.full(256, BAD, np.int64)
    checked = np.ones(256, bool)
    if name == "cocostuff" and granularity == 27:
        for c, (_, members) in enumerate(COCO27):
            t[members] = c
        t[IGN] = IGN
    elif name == "cocostuff" and granularity == 171:
        ids = [i for i in range(182) if i not in COCO_UNUSED]
        t[ids] = np.arange(171)
        t[list(COCO_UNUSED)] = IGN
        t[IGN] = IGN
    elif name == "coco80":
        things = [i for i in range(91) if i not in COCO_UNUSED]
        t[things] = np.arange(1, 81)
        t[91:182] = 0
        t[list(COCO_UNUSED)] = IGN
        t[IGN] = IGN
    elif name == "cityscapes":
        t[:7] = IGN
        t[7:34] = np.arange(27)
        t[IGN] = IGN
    elif name == "voc":
        t[:21] = np.arange(21)
        t[IGN] = IGN
    elif name == "lip":
        checked[IGN] = False
        if granularity == 19:
            t[:20] = np.arange(20)
        elif granularity == 16:
            t[:14] = np.arange(14)
            t[[14, 15]], t[[16, 17]], t[[18, 19]] = 14, 15, 16
        elif granularity == 5:
            t[0] = 0
            for c, members in enumerate(LIP5):
                t[members] = c + 1
    elif name in ("potsdam", "potsdam3"):
        for raw, c in (POTSDAM6_CLASS_OF if name == "potsdam" else POTSDAM3_CLASS_OF).items():
            t[raw] = c
        t[IGN] = IGN  # STEGO maps 255 to -1 (ignored)
    else:
        raise AssertionError((name, granularity))
    return t, checked


# (name, granularity, K_t, K_s, things-only, classes, decoder outputs)
TASKS = [
    ("cocostuff", 27, 12, 15, False, 27, 27),
    ("cocostuff", 171, 80, 91, False, 171, 171),
    ("coco80", 80, 80, 0, True, 81, 81),
    ("cityscapes", 27, 27, 0, True, 27, 28),
    ("voc", 21, 20, 0, True, 21, 21),
    ("lip", 5, 5, 0, True, 6, 6),
    ("lip", 16, 16, 0, True, 17, 17),
    ("lip", 19, 19, 0, True, 20, 20),
    ("potsdam", 6, 1, 5, False, 6, 6),
    ("potsdam3", 3, 0, 3, False, 3, 3),
]
TASK_IDS = [f"{t[0]}-{t[1]}" for t in TASKS]
TREE_OF = {"cocostuff": "coco", "coco80": "coco", "cityscapes": "cityscapes", "voc": "voc", "lip": "lip",
           "potsdam": "potsdam", "potsdam3": "potsdam"}
VALID = {"cocostuff": [27, 171], "coco80": [80], "cityscapes": [27], "voc": [21], "lip": [5, 16, 19],
         "potsdam": [6], "potsdam3": [3]}


def test_own_tables_cover_every_id():
    """Sanity of the tables above: COCO-27 groups partition 0..181, LIP-5 groups partition 1..19."""
    members = sorted(i for _, m in COCO27 for i in m)
    assert members == list(range(182))
    assert sorted(i for m in LIP5 for i in m) == list(range(1, 20))


# ---------------------------------------------------------------------------------------------------------
# fixture trees, built once per module (tests that modify one work on a copy)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    roots = {"coco": trees.make_coco(base / "MSCOCO"), "cityscapes": trees.make_cityscapes(base / "Cityscapes"),
             "voc": trees.make_voc(base / "PascalVOC"), "lip": trees.make_lip(base / "LIP"),
             "folder": trees.make_folder(base / "folder"),
             "folder-bg": trees.make_folder(base / "folder-bg", kinds=("thing", "background", "thing")),
             "folder-nolabels": trees.make_folder(base / "folder-nolabels", labels=False),
             "potsdam": trees.make_potsdam(base / "potsdam")}
    return roots


@pytest.fixture
def copy_tree(tree, tmp_path):
    def copy(key):
        return Path(shutil.copytree(tree[key], tmp_path / tree[key].name))
    return copy


def nearest(raw: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(raw.astype(np.uint8)).resize((size, size), Image.NEAREST)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# tasks and label maps
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, g, k_t, k_s, only, n_classes, n_outputs", TASKS, ids=TASK_IDS)
def test_task_matches_method(tree, name, g, k_t, k_s, only, n_classes, n_outputs):
    cfg = dataset_cfg(name, tree[TREE_OF[name]])
    task = resolve_task(cfg, g)
    assert (task.n_things, task.n_stuff, task.things_only) == (k_t, k_s, only)
    assert dataset_is_things_only(cfg) is only
    assert len(task.class_names) == n_classes and len(set(task.class_names)) == n_classes
    assert task.n_outputs == n_outputs
    if only and name != "cityscapes":
        assert task.class_names[0] == "background"
    # things first, then stuff; background first; Cityscapes not split (no miou_things / miou_stuff)
    expected = {False: ("thing",) * k_t + ("stuff",) * k_s, True: ("background",) + ("thing",) * (n_classes - 1)}
    assert task.class_kinds == (() if name == "cityscapes" else expected[only])


def test_class_names():
    assert list(resolve_task(dataset_cfg("cocostuff", "x"), 27).class_names) == [n for n, _ in COCO27]
    c171 = resolve_task(dataset_cfg("cocostuff", "x"), 171).class_names
    assert (c171[0], c171[79], c171[80], c171[170]) == ("person", "toothbrush", "banner", "wood")
    kinds27 = dict(zip(*(getattr(resolve_task(dataset_cfg("cocostuff", "x"), 27), a)
                         for a in ("class_names", "class_kinds"))))
    assert (kinds27["vehicle"], kinds27["person"], kinds27["ceiling"], kinds27["water"]) == (
        "thing", "thing", "stuff", "stuff")
    c80 = resolve_task(dataset_cfg("coco80", "x"), 80).class_names
    assert (c80[0], c80[1], c80[80]) == ("background", "person", "toothbrush")
    cs = resolve_task(dataset_cfg("cityscapes", "x"), 27).class_names
    assert (cs[0], cs[26]) == ("road", "bicycle")  # labelIds 7 and 33
    voc = resolve_task(dataset_cfg("voc", "x"), 21).class_names
    assert (voc[0], voc[15], voc[20]) == ("background", "person", "tvmonitor")
    assert resolve_task(dataset_cfg("lip", "x"), 19).class_names[13] == "face"


@pytest.mark.parametrize("name, g", [t[:2] for t in TASKS], ids=TASK_IDS)
def test_lut_matches_method_table(name, g):
    lut = resolve_task(dataset_cfg(name, "x"), g).label_lut
    table, checked = expected_table(name, g)
    raw = np.arange(256)
    np.testing.assert_array_equal(lut[raw[checked]].astype(np.int64), table[checked])
    assert (lut[[256, 1000, 40000, 65535]] == BAD).all()


@pytest.mark.parametrize("name, g", [t[:2] for t in TASKS], ids=TASK_IDS)
def test_labels_pixel_by_pixel(tree, name, g):
    """Every label of both splits, as SplitDataset yields it (resized to a square), as load_label reads a
    square label at its native size, and through the lut at native size, against the table above."""
    root = tree[TREE_OF[name]]
    cfg = dataset_cfg(name, root)
    task = resolve_task(cfg, g)
    table, _ = expected_table(name, g)
    index = prepare_index(cfg, 0)
    seen = set()
    n_square = 0
    for split in ("train", "val"):
        data = SplitDataset(index, split, 32, lut=task.label_lut, root=cfg.root)
        assert len(data) == len(index["splits"][split]) >= 2
        for i, e in enumerate(index["splits"][split]):
            path = root / e["label"]
            raw = raw_label(path)
            assert (table[raw] != BAD).all(), "fixture uses a value outside the table"
            seen |= set(np.unique(raw).tolist())
            item = data[i]
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
            assert item["label"].dtype == torch.int64
            np.testing.assert_array_equal(item["label"].numpy(), table[nearest(raw, 32)], err_msg=str(path))
            np.testing.assert_array_equal(task.label_lut[raw], table[raw], err_msg=str(path))
            if raw.shape[0] == raw.shape[1]:
                n_square += 1
                np.testing.assert_array_equal(load_label(path, raw.shape[0], task.label_lut).numpy(), table[raw])
    assert n_square >= 1
    if name in ("cocostuff", "coco80"):  # the fixture uses every PNG id, unused thing ids included
        assert set(range(182)) | {255} <= seen
        if g != 27:
            assert (table[list(COCO_UNUSED)] == IGN).all()


@pytest.mark.parametrize("kinds, g, names, only, n_outputs, remap", [
    (("thing", "thing", "stuff", "stuff"), 4, ("cat", "dog", "grass", "sky"), False, 4, {0: 0, 1: 1, 2: 2, 3: 3}),
    (("thing", "background", "thing"), 2, ("background", "cat", "dog"), True, 3, {1: 0, 0: 1, 2: 2}),
], ids=["things+stuff", "things-only"])
def test_folder_with_classes_yaml(tree, kinds, g, names, only, n_outputs, remap):
    root = tree["folder" if not only else "folder-bg"]
    cfg = dataset_cfg("folder", root)
    task = resolve_task(cfg, g)
    assert task.class_names == names
    assert (task.n_things, task.n_stuff, task.things_only, task.n_outputs) == (
        kinds.count("thing"), kinds.count("stuff"), only, n_outputs)
    assert dataset_is_things_only(cfg) is only
    assert task.class_kinds == tuple(kinds[raw] for raw in sorted(remap, key=remap.get))  # in class order
    table = np.full(256, BAD)
    table[list(remap)] = list(remap.values())
    table[IGN] = IGN
    np.testing.assert_array_equal(task.label_lut[:256], table)
    index = prepare_index(cfg, 0)
    for split in ("train", "val"):
        data = SplitDataset(index, split, 32, lut=task.label_lut, root=cfg.root)
        for i, e in enumerate(index["splits"][split]):
            raw = raw_label(root / e["label"])
            item = data[i]
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
            np.testing.assert_array_equal(item["label"].numpy(), table[nearest(raw, 32)])


# ---------------------------------------------------------------------------------------------------------
# split listing
# ---------------------------------------------------------------------------------------------------------
def test_coco_lists_annotated_images_sorted_by_id(tree):
    root = tree["coco"]
    cfg = dataset_cfg("cocostuff", root)
    train, val = list_split(cfg, "train"), list_split(cfg, "val")
    assert [e["id"] for e in train] == ["000000000009", "000000000139", "000000000285"]
    assert [e["id"] for e in val] == ["000000000632", "000000001000"]
    assert (root / "images/train2017/000000000005.jpg").is_file()  # on disk, but without annotation
    for split, entries in (("train2017", train), ("val2017", val)):
        for e in entries:
            assert e["image"] == f"images/{split}/{e['id']}.jpg"
            assert e["label"] == f"annotations/{split}/{e['id']}.png"
            assert (root / e["image"]).is_file() and (root / e["label"]).is_file()
    assert list_split(dataset_cfg("coco80", root), "val") == val


def test_image_list_restricts_a_split(tree, tmp_path):
    lst = tmp_path / "curated_train.txt"
    lst.write_text("# curated\n000000000285\n\n000000000009.jpg\r\n000000099999\n")
    cfg = dataset_cfg("cocostuff", tree["coco"], image_list={"train": str(lst), "val": None})
    assert [e["id"] for e in list_split(cfg, "train")] == ["000000000009", "000000000285"]
    assert len(list_split(cfg, "val")) == 2
    index = prepare_index(cfg, 0)
    assert [e["id"] for e in index["splits"]["train"]] == ["000000000009", "000000000285"]

    vl = trees.write_list(tmp_path / "val_subset.txt", ["2007_000042"])
    voc = dataset_cfg("voc", tree["voc"], image_list={"train": None, "val": str(vl)})
    assert [e["id"] for e in list_split(voc, "val")] == ["2007_000042"]


def test_image_list_leaving_nothing_is_an_error(tree, tmp_path):
    lst = trees.write_list(tmp_path / "none.txt", ["000000424242"])
    cfg = dataset_cfg("cocostuff", tree["coco"], image_list={"train": str(lst), "val": None})
    with pytest.raises(FileNotFoundError, match="no train images") as e:
        list_split(cfg, "train")
    assert str(tree["coco"]) in str(e.value) and "docs/usage.md" in str(e.value)


def test_image_list_ids_with_dots(copy_tree, tmp_path):
    root = copy_tree("folder-nolabels")
    shutil.move(root / "images/train/a_rgb.jpg", root / "images/train/a.v2.jpg")
    lst = trees.write_list(tmp_path / "train.txt", ["a.v2", "b_gray"])
    cfg = dataset_cfg("folder", root, n_things=2, image_list={"train": str(lst), "val": None})
    assert [e["id"] for e in list_split(cfg, "train")] == ["a.v2", "b_gray"]


def test_image_list_of_cityscapes_file_names(tree, tmp_path):
    lst = trees.write_list(tmp_path / "train.txt", ["aachen_000000_000001_leftImg8bit.png",
                                                    "bochum/bochum_000000_000002_leftImg8bit.png"])
    cfg = dataset_cfg("cityscapes", tree["cityscapes"], image_list={"train": str(lst), "val": None})
    assert [e["id"] for e in list_split(cfg, "train")] == ["aachen_000000_000001", "bochum_000000_000002"]


@pytest.mark.parametrize("name, key, expected", [
    ("voc", "voc", trees.VOC_IDS),
    ("lip", "lip", trees.LIP_IDS),
    ("potsdam", "potsdam", {"train": trees.POTSDAM_IDS["labelled_train"], "val": trees.POTSDAM_IDS["labelled_test"]}),
    ("cityscapes", "cityscapes", {s: [stem for _, stem in f] for s, f in trees.CITYSCAPES_FILES.items()}),
])
def test_split_lists(tree, name, key, expected):
    root = tree[key]
    for split in ("train", "val"):
        entries = list_split(dataset_cfg(name, root), split)
        assert [e["id"] for e in entries] == expected[split]
        for e in entries:
            assert (root / e["image"]).is_file() and (root / e["label"]).is_file()
    if name == "voc":  # the detection-only image is in no list
        assert (root / "JPEGImages/2008_000001.jpg").is_file()
    if name == "cityscapes":
        e = list_split(dataset_cfg(name, root), "train")[2]
        assert e["image"] == "leftImg8bit/train/bochum/bochum_000000_000002_leftImg8bit.png"
        assert e["label"] == "gtFine/train/bochum/bochum_000000_000002_gtFine_labelIds.png"


def test_folder_lists_images_of_any_extension(tree):
    for key, labelled in (("folder", True), ("folder-nolabels", False)):
        cfg = dataset_cfg("folder", tree[key], n_things=2)
        for split, files in trees.FOLDER_FILES.items():
            entries = list_split(cfg, split)
            assert [(e["id"], e["image"]) for e in entries] == [
                (stem, f"images/{split}/{stem}{ext}") for stem, ext, _ in files]
            assert [e["label"] for e in entries] == [
                f"labels/{split}/{stem}.png" if labelled else None for stem, _, _ in files]


def test_folder_missing_label_is_an_error(copy_tree):
    """docs/usage.md, 'Your own images': when labels/ exists, every image needs its label."""
    root = copy_tree("folder")
    missing = root / "labels/val/d_palette.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as e:
        prepare_index(dataset_cfg("folder", root), 0)
    assert str(missing) in str(e.value) and "docs/usage.md" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, missing", [
    ("cocostuff", "images/train2017"), ("coco80", "images/train2017"), ("cityscapes", "leftImg8bit/train"),
    ("voc", "ImageSets/Segmentation/train.txt"), ("lip", "train_id.txt"), ("folder", "images/train"),
    ("potsdam", "labelled_train.txt"),
])
def test_missing_dataset_folder(tmp_path, name, missing):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        prepare_index(dataset_cfg(name, root, n_things=2), 0)
    assert str(root / missing) in str(e.value) and "docs/usage.md" in str(e.value)


@pytest.mark.parametrize("key, name, remove", [
    ("coco", "cocostuff", "annotations/instances_val2017.json"),
    ("coco", "cocostuff", "annotations/val2017"),
    ("cityscapes", "cityscapes", "gtFine/val"),
    ("voc", "voc", "ImageSets/Segmentation/val.txt"),
    ("voc", "voc", "SegmentationClass"),
    ("lip", "lip", "val_id.txt"),
    ("lip", "lip", "val_segmentations"),
    ("potsdam", "potsdam3", "labelled_test.txt"),
    ("potsdam", "potsdam", "gt"),
])
def test_missing_part_of_a_dataset(copy_tree, key, name, remove):
    root = copy_tree(key)
    path = root / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError) as e:
        prepare_index(dataset_cfg(name, root), 0)
    assert str(path) in str(e.value) and "docs/usage.md" in str(e.value)


def test_missing_image_list_file(tree, tmp_path):
    lst = tmp_path / "lists" / "curated_val.txt"
    cfg = dataset_cfg("cocostuff", tree["coco"], image_list={"train": None, "val": str(lst)})
    with pytest.raises(FileNotFoundError) as e:
        prepare_index(cfg, 0)
    assert str(lst) in str(e.value) and "docs/usage.md" in str(e.value)


@pytest.mark.parametrize("name, bad", [("cocostuff", 28), ("cocostuff", 80), ("coco80", 81), ("cityscapes", 19),
                                       ("voc", 20), ("lip", 6), ("lip", 20), ("potsdam", 3), ("potsdam3", 6)])
def test_invalid_granularity(name, bad):
    with pytest.raises(ValueError) as e:
        resolve_task(dataset_cfg(name, "x"), bad)
    msg = str(e.value)
    assert re.search(rf"\b{bad}\b", msg) and name in msg
    for other, valid in VALID.items():  # every valid pair is listed
        assert other in msg and all(re.search(rf"\b{v}\b", msg) for v in valid), (other, msg)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"dataset.name: expected one of .*, got 'imagenet'") as e:
        dataset_cfg("imagenet", "x")  # the config refuses it: the library never sees it
    assert all(n in str(e.value) for n in VALID)


def test_folder_granularity_must_match_classes_yaml(tree):
    with pytest.raises(ValueError) as e:
        resolve_task(dataset_cfg("folder", tree["folder"]), 5)
    assert "classes.yaml" in str(e.value) and re.search(r"\b4\b", str(e.value)) and re.search(r"\b5\b", str(e.value))


@pytest.mark.parametrize("text", [
    "classes: [{name: a, kind: thing}, {name: b, kind: object}]\n",
    "classes: [{name: a, kind: background}, {name: b, kind: background}, {name: c, kind: thing}]\n",
    "classes: [{name: a, kind: background}, {name: b, kind: stuff}, {name: c, kind: thing}]\n",
    "names: [a, b]\n",
    "classes: [a: b: c\n",
], ids=["unknown-kind", "two-backgrounds", "background-and-stuff", "no-classes-key", "not-yaml"])
def test_bad_classes_yaml(copy_tree, text):
    root = copy_tree("folder")
    (root / "classes.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(root / "classes.yaml"))):
        resolve_task(dataset_cfg("folder", root), 2)


@pytest.mark.parametrize("key, name, rel, split", [
    ("voc", "voc", "JPEGImages/2007_000039.jpg", "train"),
    ("coco", "cocostuff", "images/val2017/000000001000.jpg", "val"),
    ("folder", "folder", "images/train/c_rgba.png", "train"),
])
def test_truncated_image(copy_tree, key, name, rel, split):
    root = copy_tree(key)
    path = trees.truncate(root / rel, 100)
    cfg = dataset_cfg(name, root)
    g = {"voc": 21, "cocostuff": 27, "folder": 4}[name]
    task = resolve_task(cfg, g)
    with pytest.raises(OSError, match=re.escape(str(path))):
        load_rgb(path, 32)

    index = prepare_index(cfg, 0)  # not checked: listed, and reading it fails naming the file
    i = [e["image"] for e in index["splits"][split]].index(rel)
    with pytest.raises(OSError, match=re.escape(str(path))):
        SplitDataset(index, split, 32, lut=task.label_lut, root=cfg.root)[i]

    checked = prepare_index(cfg, 0, check_images=True)
    assert rel not in [e["image"] for e in checked["splits"][split]]
    assert len(checked["splits"][split]) == len(index["splits"][split]) - 1
    assert list(checked["skipped"][split]) == [rel]
    other = "val" if split == "train" else "train"
    assert list(checked["skipped"][other]) == []
    assert checked["splits"][other] == index["splits"][other]


@pytest.mark.parametrize("key, name, g, rel, value", [
    ("voc", "voc", 21, "SegmentationClass/2007_000033.png", 200),
    ("voc", "voc", 21, "SegmentationClass/2007_000033.png", 21),
    ("lip", "lip", 19, "val_segmentations/10008_222016.png", 40),
    ("lip", "lip", 5, "val_segmentations/10008_222016.png", 20),
    ("coco", "cocostuff", 171, "annotations/val2017/000000000632.png", 200),
    ("cityscapes", "cityscapes", 27, "gtFine/val/lindau/lindau_000000_000001_gtFine_labelIds.png", 34),
    ("folder", "folder", 4, "labels/val/d_palette.png", 4),
])
def test_label_value_outside_the_map(copy_tree, key, name, g, rel, value):
    root = copy_tree(key)
    path = root / rel
    with Image.open(path) as im:
        mode, palette = im.mode, im.getpalette()
        a = np.asarray(im).copy()
    a[:6, :6] = value
    out = Image.fromarray(a, mode)
    if palette:
        out.putpalette(palette)
    out.save(path)
    cfg = dataset_cfg(name, root)
    task = resolve_task(cfg, g)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        load_label(path, 32, task.label_lut)
    assert re.search(rf"\b{value}\b", str(e.value))
    index = prepare_index(cfg, 0)
    i = [e["label"] for e in index["splits"]["val"]].index(rel)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SplitDataset(index, "val", 32, lut=task.label_lut, root=cfg.root)[i]


def test_colour_label_file_is_an_error(copy_tree):
    root = copy_tree("voc")
    path = root / "SegmentationClass/2007_000033.png"
    with Image.open(path) as im:
        im.convert("RGB").save(path)
    with pytest.raises(OSError, match=re.escape(str(path))):
        load_label(path, 32, resolve_task(dataset_cfg("voc", root), 21).label_lut)


# ---------------------------------------------------------------------------------------------------------
# image modes
# ---------------------------------------------------------------------------------------------------------
def _uniform(tmp_path, name, im):
    path = tmp_path / name
    im.save(path)
    return path


@pytest.mark.parametrize("make, rgb", [
    (lambda: Image.new("L", (10, 14), 77), (77, 77, 77)),
    (lambda: Image.new("RGBA", (10, 14), (10, 20, 30, 0)), (10, 20, 30)),
    (lambda: Image.new("LA", (10, 14), (90, 5)), (90, 90, 90)),
    (lambda: Image.new("1", (10, 14), 1), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((14, 10), 65535, np.uint16)), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((14, 10), 0, np.uint16)), (0, 0, 0)),
    (lambda: Image.fromarray(np.full((14, 10), 100 * 257, np.uint16)), (100, 100, 100)),
], ids=["L", "RGBA", "LA", "1", "I16-max", "I16-zero", "I16-mid"])
def test_image_modes_load_as_uint8_rgb(tmp_path, make, rgb):
    path = _uniform(tmp_path, "im.png", make())
    x = load_rgb(path, 16)
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    assert (x == torch.tensor(rgb, dtype=torch.uint8)[:, None, None]).all(), x[:, 0, 0]


def test_palette_image_loads_its_colours(tmp_path):
    a = np.zeros((12, 12), np.uint8)
    a[:, 6:] = 3
    im = Image.fromarray(a, "P")
    im.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    x = load_rgb(_uniform(tmp_path, "p.png", im), 12)
    assert x.shape == (3, 12, 12)
    assert (x[:, :, :6] == 0).all()
    assert (x[:, :, 6:] == torch.tensor([200, 100, 50], dtype=torch.uint8)[:, None, None]).all()


def test_folder_fixture_images_of_every_mode(tree):
    root = tree["folder"]
    for split, files in trees.FOLDER_FILES.items():
        for stem, ext, mode in files:
            x = load_rgb(root / "images" / split / f"{stem}{ext}", 24)
            assert x.dtype == torch.uint8 and x.shape == (3, 24, 24), mode
            assert x.float().std() > 5, f"{mode}: no structure left"  # the coloured blocks survive
    # the 16-bit val image is square: at its native size it is its 8-bit grey levels exactly, 65535 -> 255
    path = root / "images/val/e_16bit.png"
    with Image.open(path) as im:
        a16 = np.asarray(im).astype(np.int64)
    assert a16.max() == 65535
    x = load_rgb(path, a16.shape[0]).numpy()
    expected = np.round(a16 / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(x, np.broadcast_to(expected, x.shape))
    assert (x[:, a16 == 65535] == 255).all()


# ---------------------------------------------------------------------------------------------------------
# a folder without labels or classes.yaml
# ---------------------------------------------------------------------------------------------------------
def test_folder_without_labels(tree):
    root = tree["folder-nolabels"]
    task = resolve_task(dataset_cfg("folder", root, n_things=2), 5)
    assert (task.n_things, task.n_stuff, task.things_only, task.n_outputs) == (2, 3, False, 5)
    assert len(task.class_names) == 5 and task.label_lut is None
    assert dataset_is_things_only(dataset_cfg("folder", root, n_things=2)) is False

    only = dataset_cfg("folder", root, things_only=True)
    task = resolve_task(only, 3)
    assert (task.n_things, task.n_stuff, task.things_only, task.n_outputs) == (3, 0, True, 4)
    assert len(task.class_names) == 4 and task.class_names[0] == "background"
    assert dataset_is_things_only(only) is True

    index = prepare_index(dataset_cfg("folder", root, n_things=2), 0)
    item = SplitDataset(index, "val", 16, lut=None, root=root)[0]
    assert "label" not in item and item["image"].shape == (3, 16, 16)
    assert all(e["label"] is None for s in ("train", "val") for e in index["splits"][s])


@pytest.mark.parametrize("n_things, g", [(5, 5), (6, 5), (None, 5), (1, 1)])
def test_folder_without_labels_needs_fewer_things_than_granularity(tree, n_things, g):
    with pytest.raises(ValueError) as e:
        resolve_task(dataset_cfg("folder", tree["folder-nolabels"], n_things=n_things), g)
    msg = str(e.value)
    assert "n_things" in msg and "granularity" in msg
    assert f"n_things={n_things}" in msg and f"granularity={g}" in msg


def test_folder_n_things_is_null_or_positive(tree):
    with pytest.raises(ValueError, match=r"dataset.n_things: expected an integer >= 1 or null, got 0"):
        dataset_cfg("folder", tree["folder-nolabels"], n_things=0)


# ---------------------------------------------------------------------------------------------------------
# The curated COCO-Stuff lists shipped in transfgu/data/lists/ (dataset.image_list: curated)
# ---------------------------------------------------------------------------------------------------------
def test_shipped_curated_lists_hold_the_published_counts():
    from transfgu.data.adapters import read_image_list
    from transfgu.data.index import SHIPPED_LISTS
    train = read_image_list(SHIPPED_LISTS / "cocostuff_curated_train.txt")
    val = read_image_list(SHIPPED_LISTS / "cocostuff_curated_val.txt")
    assert (len(train), len(set(train))) == (49629, 49629)
    assert (len(val), len(set(val))) == (2175, 2175)
    assert not set(train) & set(val)
    assert all(len(i) == 12 and i.isdigit() for i in train + val)


@pytest.mark.parametrize("granularity", [27, 171])
def test_curated_selects_the_listed_images_of_a_coco_tree(tmp_path, monkeypatch, granularity):
    # 25 and 30 are curated train ids, 139 a curated val id; 9 and 632 are in neither list
    monkeypatch.setattr(trees, "COCO_TRAIN_IDS", [25, 9, 30])
    monkeypatch.setattr(trees, "COCO_VAL_IDS", [632, 139])
    root = trees.make_coco(tmp_path / "coco", n_train=3, n_val=2)
    everything = prepare_index(dataset_cfg("cocostuff", root), 0)
    assert [e["id"] for e in everything["splits"]["train"]] == ["000000000009", "000000000025", "000000000030"]
    cfg = dataset_cfg("cocostuff", root, image_list="curated")
    resolve_task(cfg, granularity)
    index = prepare_index(cfg, 0)
    assert [e["id"] for e in index["splits"]["train"]] == ["000000000025", "000000000030"]
    assert [e["id"] for e in index["splits"]["val"]] == ["000000000139"]


def test_unknown_shipped_list_name_is_an_error(tree):
    with pytest.raises(ValueError, match=r"dataset.image_list: 'curated' is not a list set shipped for dataset 'voc'"):
        dataset_cfg("voc", tree["voc"], image_list="curated")
    with pytest.raises(ValueError, match=r"dataset.image_list: expected null"):
        dataset_cfg("cocostuff", tree["coco"], image_list={"train": None, "test": "x.txt"})


def test_shipped_lists_are_package_data():
    """The lists are found inside the package (importlib.resources), not beside a source checkout, and
    pyproject.toml declares them as package data, so a non-editable install ships them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from importlib.resources import files

    from transfgu.data.index import SHIPPED_LISTS
    shipped = files("transfgu.data") / "lists"
    assert Path(str(shipped)).resolve() == SHIPPED_LISTS
    globs = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["transfgu.data"]
    names = {p.name for g in globs for p in SHIPPED_LISTS.parent.glob(g)}
    assert {"cocostuff_curated_train.txt", "cocostuff_curated_val.txt"} <= names


# ---------------------------------------------------------------------------------------------------------
# Potsdam: .mat files (scipy.io), RGB + infrared images
# ---------------------------------------------------------------------------------------------------------
def test_potsdam_image_is_its_first_three_channels(tree):
    """STEGO reads `loadmat(imgs/<id>.mat)["img"]` and keeps channels 0..2 (RGB; channel 3 is infrared)."""
    from scipy.io import loadmat
    root = tree["potsdam"]
    for i in trees.POTSDAM_IDS["labelled_train"] + trees.POTSDAM_IDS["unlabelled_train"]:
        img = loadmat(root / "imgs" / f"{i}.mat")["img"]
        assert img.shape[2] == 4 and img.dtype == np.uint8
        h = img.shape[0]
        np.testing.assert_array_equal(load_rgb(root / "imgs" / f"{i}.mat", h).permute(1, 2, 0).numpy(), img[:, :, :3])
        resized = np.asarray(Image.fromarray(img[:, :, :3]).resize((32, 32), Image.BILINEAR))
        np.testing.assert_array_equal(load_rgb(root / "imgs" / f"{i}.mat", 32).permute(1, 2, 0).numpy(), resized)


def test_potsdam_unlabelled_images_are_not_listed(tree):
    entries = [e["id"] for split in ("train", "val") for e in list_split(dataset_cfg("potsdam", tree["potsdam"]),
                                                                         split)]
    assert not set(entries) & set(trees.POTSDAM_IDS["unlabelled_train"])
    assert sorted(entries) == sorted(trees.POTSDAM_IDS["labelled_train"] + trees.POTSDAM_IDS["labelled_test"])


def test_potsdam_label_value_outside_the_map(copy_tree):
    from scipy.io import loadmat, savemat
    root = copy_tree("potsdam")
    path = root / "gt" / f"{trees.POTSDAM_IDS['labelled_test'][0]}.mat"
    gt = loadmat(path)["gt"]
    gt[:4, :4] = 6
    savemat(path, {"gt": gt})
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*\b6\b"):
        load_label(path, 32, resolve_task(dataset_cfg("potsdam", root), 6).label_lut)


@pytest.mark.parametrize("what", ["truncated", "wrong key"])
def test_potsdam_unreadable_mat_names_the_file(copy_tree, what):
    from scipy.io import savemat
    root = copy_tree("potsdam")
    path = root / "imgs" / f"{trees.POTSDAM_IDS['labelled_train'][1]}.mat"
    if what == "truncated":
        trees.truncate(path, 100)
    else:
        savemat(path, {"image": np.zeros((8, 8, 4), np.uint8)})
    with pytest.raises(OSError, match=re.escape(str(path))):
        load_rgb(path, 32)
    index = prepare_index(dataset_cfg("potsdam", root), 0, check_images=True)
    assert index["skipped"]["train"] == [f"imgs/{path.name}"]
