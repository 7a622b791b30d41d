"""The dataset is part of the DAG: through real `dvc repro` in a temporary git repository, on an image folder with
labels and classes.yaml, adding an image or editing classes.yaml re-runs what depends on them, and touching
nothing re-runs nothing but `prepare` (which re-reads the dataset on every repro and writes the same index)."""
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import dataset_trees as trees
from tiny_project import copy_project, default_params
from tiny_project import run as run_in_project

pytestmark = pytest.mark.slow  # the whole module spawns dvc / torchrun / bash processes

REPO = Path(__file__).resolve().parent.parent
AFTER_PREPARE = {"extract", "cluster", "pseudo", "train", "evaluate", "probe"}
TINY = {"granularity": 4,
        "dataset": {"name": "folder", "root": "data/folder", "R": 32},
        "extract": {"batch_size": 4, "crop_batch": 64}, "cluster": {"niter": 10}, "pseudo": {"batch_size": 4},
        "train": {"epochs": 1, "batch_size": 2, "bootstrap_start": 1, "bootstrap_intervals": [1]},
        "evaluate": {"batch_size": 4, "n_pictures": 1, "patch_kmeans_baseline": False},
        "probe": {"epochs": 1, "batch_size": 4}}


def run(args, cwd, check=True):
    return run_in_project(args, cwd, check, OMP_NUM_THREADS="1")


def repro(root) -> set:
    out = run([sys.executable, "-m", "dvc", "repro"], root)
    return set(re.findall(r"Running stage '(\w+)'", out.stdout + out.stderr))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    copy_project(root, default_params(TINY))
    trees.make_folder(root / "data" / "folder")
    (root / ".gitignore").write_text("/data/folder/\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    assert repro(root) == {"prepare"} | AFTER_PREPARE
    return root


def test_touching_nothing_reruns_nothing_after_prepare(project):
    index = (project / "outputs" / "index.json").read_bytes()
    assert repro(project) == {"prepare"}
    assert (project / "outputs" / "index.json").read_bytes() == index


def test_adding_an_image_reruns_what_reads_the_index(project):
    train = project / "data" / "folder" / "images" / "train"
    shutil.copy(train / "a_rgb.jpg", train / "z_copy.jpg")
    shutil.copy(project / "data/folder/labels/train/a_rgb.png", project / "data/folder/labels/train/z_copy.png")
    assert repro(project) == {"prepare"} | AFTER_PREPARE
    assert repro(project) == {"prepare"}


def test_replacing_an_image_with_other_bytes_reruns(project):
    image = project / "data" / "folder" / "images" / "train" / "b_gray.png"
    data = image.read_bytes()
    image.write_bytes(data + b"\0")  # same picture, another file: size and time change
    assert repro(project) == {"prepare"} | AFTER_PREPARE


def test_editing_classes_yaml_reruns_every_stage_that_reads_the_task(project):
    path = project / "data" / "folder" / "classes.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["classes"][1]["kind"], doc["classes"][2]["kind"] = "stuff", "thing"  # still 2 things + 2 stuff
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert repro(project) == {"prepare"} | AFTER_PREPARE


def test_a_misspelt_classes_yaml_stops_prepare_in_one_line(project):
    path = project / "data" / "folder" / "classes.yaml"
    good = path.read_text()
    path.write_text("classes: [{name: cat, thing: true}, {name: dog, thing: true}, {name: grass, thing: false}, "
                    "{name: sky, thing: false}]\n")
    try:
        proc = run([sys.executable, "-m", "dvc", "repro"], project, check=False)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert "unknown key 'thing' (valid: name, kind; did you mean kind?)" in text, text[-3000:]
        assert "Traceback" not in text
    finally:
        path.write_text(good)
