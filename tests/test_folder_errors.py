"""Folder-dataset mistakes that must stop with a clear message."""
import numpy as np
import pytest
from PIL import Image

from dataset_trees import dataset_cfg
from transfgu.data.index import list_split
from transfgu.data.tasks import resolve_task


def _img(path, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(path)


def test_two_images_with_one_stem_are_refused(tmp_path):
    _img(tmp_path / "images" / "train" / "x.jpg")
    _img(tmp_path / "images" / "train" / "x.png")
    with pytest.raises(ValueError, match="same name stem 'x'"):
        list_split(dataset_cfg("folder", tmp_path), "train")


def test_labels_without_classes_yaml_are_refused(tmp_path):
    _img(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="classes.yaml"):
        resolve_task(dataset_cfg("folder", tmp_path, n_things=2), 4)
