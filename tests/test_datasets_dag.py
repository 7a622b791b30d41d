"""The six pipeline stages, in-process, for every (dataset, granularity) pair of docs/method.md ("Datasets and
granularities") and for a plain image folder with and without labels, on the tiny fixture trees of
dataset_trees.py (much faster than through DVC; tests/test_pipeline.py covers the DVC wiring)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dataset_trees as trees
from transfgu.config import dataset_config
from transfgu.data.tasks import resolve_task
from tiny_project import merge, run_stage_here  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "extract", "cluster", "pseudo", "train", "evaluate", "probe")

TINY = {
    "seed": 0,
    "dataset": {"R": 32},
    "backbone": {"arch": "vit_mini", "patch_size": 8, "checkpoint": None},  # random weights
    "extract": {"window_sizes": "auto", "batch_size": 4, "crop_batch": 64},
    "cluster": {"niter": 20},
    "pseudo": {"batch_size": 4},
    "train": {"epochs": 2, "batch_size": 2, "bootstrap_start": 1, "bootstrap_intervals": [1]},
    "evaluate": {"batch_size": 4, "n_pictures": 1},
    "probe": {"epochs": 1, "batch_size": 4},
}

# (id, dataset name, granularity, tree builder, extra dataset keys, extra params)
CASES = [
    ("cocostuff-27", "cocostuff", 27, trees.make_coco, {}, {}),
    # k-means needs >= 80 thing and >= 91 stuff crops: more train images
    ("cocostuff-171", "cocostuff", 171, lambda root: trees.make_coco(root, n_train=6), {}, {}),
    # k-means needs >= 80 thing crops: the published windows give 58 per image at R = 32 (things-only sizes)
    ("coco80-80", "coco80", 80, lambda root: trees.make_coco(root, n_train=6), {}, {}),
    ("cityscapes-27", "cityscapes", 27, trees.make_cityscapes, {}, {}),
    ("voc-21", "voc", 21, trees.make_voc, {}, {}),
    ("lip-5", "lip", 5, trees.make_lip, {}, {}),
    ("lip-16", "lip", 16, trees.make_lip, {}, {}),
    ("lip-19", "lip", 19, trees.make_lip, {}, {}),
    ("folder-labels-4", "folder", 4, trees.make_folder, {}, {}),
    ("folder-labels-things-only-2", "folder", 2,
     lambda root: trees.make_folder(root, kinds=("thing", "background", "thing")), {}, {}),
    ("potsdam-6", "potsdam", 6, trees.make_potsdam, {}, {}),
    ("potsdam3-3", "potsdam3", 3, trees.make_potsdam, {}, {}),  # no thing concept: K_t = 0
]


@pytest.fixture
def stage_modules(monkeypatch):
    """The stage scripts run in this process (much faster than a process each); global torch state restored."""
    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and much faster on a shared machine
    yield run_stage_here
    torch.set_num_threads(threads)


def run_pipeline(tmp_path, monkeypatch, stage_modules, name, granularity, build, dataset_extra, params_extra):
    root = build(tmp_path / "data" / name)
    project = tmp_path / "project"
    project.mkdir()
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    params["granularity"] = granularity
    params["dataset"].update(name=name, root=str(root), image_list={"train": None, "val": None},
                             skip_bad=False, n_things=None, things_only=False)
    merge(params, {"dataset": dataset_extra, **params_extra})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")  # the stages read their files from it
    for stage in STAGES:
        stage_modules(stage)
    return project, params, resolve_task(dataset_config(params["dataset"]), granularity)


def check_common_outputs(project, task):
    out = project / "outputs"
    index = json.loads((out / "index.json").read_text())
    with h5py.File(out / "feature_bank.h5", "r") as h5:
        assert h5["thing/features"].shape[0] >= task.n_things
        if task.n_stuff:
            assert h5["stuff/features"].shape[0] >= task.n_stuff
    centroids = np.load(out / "centroids.npz")
    assert centroids["centroids"].shape[0] == task.n_concepts
    with h5py.File(out / "pseudo_masks.h5", "r") as h5:
        assert h5["gradient"].shape[:2] == (len(index["splits"]["train"]), task.n_concepts)
    assert (out / "pseudo_metrics.json").is_file()
    state = torch.load(out / "decoder.pt", map_location="cpu", weights_only=True)
    assert state["cls_emb"].shape[1] == task.n_outputs
    assert state["mask_norm.weight"].shape == (task.n_outputs,)
    return index, json.loads((out / "pseudo_metrics.json").read_text())


@pytest.mark.parametrize("name, granularity, build, dataset_extra, params_extra",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pipeline_on_labelled_dataset(tmp_path, monkeypatch, stage_modules, name, granularity, build,
                                      dataset_extra, params_extra):
    project, params, task = run_pipeline(tmp_path, monkeypatch, stage_modules, name, granularity, build,
                                         dataset_extra, params_extra)
    index, pseudo = check_common_outputs(project, task)
    assert 0 <= pseudo["pseudo_miou"] <= 100 and 0 <= pseudo["pseudo_pixel_accuracy"] <= 100
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_accuracy"] <= 100
    details = json.loads((project / "outputs" / "eval_details.json").read_text())
    assert details["n_classes"] == len(task.class_names)
    assert details["n_images"] == len(index["splits"]["val"])
    split = ("thing" in task.class_kinds, "stuff" in task.class_kinds)  # things-only sets are not split
    assert ("miou_things" in metrics, "miou_stuff" in metrics) == split
    assert ("pseudo_miou_things" in pseudo, "pseudo_miou_stuff" in pseudo) == split
    assert all(0 <= metrics[k] <= 100 for k in ("miou_things", "miou_stuff") if k in metrics)
    shares = ("attention_foreground_thing_share", "thing_share")  # the attention's thing pixels vs the images'
    assert all((k in pseudo) == split[0] and 0 <= pseudo.get(k, 0) <= 100 for k in shares)
    probe = json.loads((project / "outputs" / "probe_metrics.json").read_text())
    assert sorted(probe) == ["linear_miou", "linear_pixel_accuracy"] and all(0 <= v <= 100 for v in probe.values())


def test_pipeline_on_unlabelled_folder(tmp_path, monkeypatch, stage_modules):
    """No labels, no classes.yaml: dataset.n_things and granularity set the concepts; train keeps the last
    epoch; evaluate writes no metrics (n_images in eval_details.json), the predictions as raw label PNGs, and a
    matching that calls every cluster "cluster i"."""
    project, params, task = run_pipeline(tmp_path, monkeypatch, stage_modules, "folder", 5,
                                         lambda root: trees.make_folder(root, labels=False), {"n_things": 2},
                                         {"train": {"select_by": "last"}})
    assert (task.n_things, task.n_stuff, task.n_outputs) == (2, 3, 5) and task.label_lut is None
    index, pseudo = check_common_outputs(project, task)
    assert "pseudo_miou" not in pseudo
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    val = index["splits"]["val"]
    assert json.loads((project / "outputs" / "eval_details.json").read_text())["n_images"] == len(val)
    assert "miou" not in metrics and "pixel_accuracy" not in metrics
    assert json.loads((project / "outputs" / "probe_metrics.json").read_text()) == {}  # no labels: no probe numbers
    matching = json.loads((project / "outputs" / "cluster_classes.json").read_text())
    assert [(e["name"], e["class_id"]) for e in matching["clusters"]] == [(f"cluster {i}", None) for i in range(5)]
    predictions = sorted((project / "outputs" / "predictions").rglob("*.png"))
    assert len(predictions) == len(val)
    for e in val:
        assert sum(e["id"] in p.name for p in predictions) == 1, (e["id"], predictions)
    for p in predictions:
        with Image.open(p) as im:
            assert im.mode in ("L", "P", "I", "I;16")
            a = np.asarray(im)
        assert a.ndim == 2 and a.min() >= 0 and a.max() < task.n_outputs


def test_pipeline_skips_unreadable_images(tmp_path, monkeypatch, stage_modules):
    """dataset.skip_bad: prepare leaves a truncated image out (listed under `skipped`), the rest runs."""
    def build(root):
        trees.make_voc(root)
        trees.truncate(root / "JPEGImages" / "2007_000039.jpg")
        return root

    project, params, task = run_pipeline(tmp_path, monkeypatch, stage_modules, "voc", 21, build,
                                         {"skip_bad": True}, {})
    index, _ = check_common_outputs(project, task)
    assert index["skipped"] == {"train": ["JPEGImages/2007_000039.jpg"], "val": []}
    assert [e["id"] for e in index["splits"]["train"]] == ["2007_000032", "2007_000063"]
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 100
