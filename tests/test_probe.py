"""The linear probe (transfgu/probe.py, stages/probe.py): it learns a linearly separable toy problem to 100 %, its
scores are the unmatched class-for-class IoU, it resumes from its per-epoch checkpoint to the same weights, a split
without labels is reported in one line with no probe numbers, and its DVC params leave out train.*."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dataset_trees as trees
from tiny_project import default_params, run_stage_here
from transfgu.probe import (ProbeSettings, direct_scores, epoch_order, probe_confusion, probe_loss, train_probe,
                            upsample_bilinear)

REPO = Path(__file__).resolve().parent.parent
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)  # one per class


class PatchColour(torch.nn.Module):
    """A stand-in backbone whose patch tokens are each patch's mean colour (then zeros): 4 distinct directions, one
    per class of the toy images, so the classes are linearly separable in the (L2-normalised) features."""
    patch_size, embed_dim = 8, 6

    def normalize(self, x):
        return x

    def forward(self, x):
        p = self.patch_size
        mean = torch.nn.functional.avg_pool2d(x, p).flatten(2).transpose(1, 2)  # (B, hw, 3)
        tokens = torch.cat([mean, torch.zeros(*mean.shape[:2], self.embed_dim - 3)], -1)
        return torch.cat([torch.ones(len(x), 1, self.embed_dim), tokens], 1)  # a [CLS] token first


class Toy(torch.utils.data.Dataset):
    """32 x 32 images of 4 x 4 patches of 8 px, each patch in the colour of its class (seeded); the label is the
    class, with a 3-px ignored band (255) inside every patch border (bilinear upsampling blends neighbouring patches
    there)."""
    size = 32

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.classes = rng.integers(0, 4, size=(n, 4, 4))

    def __len__(self):
        return len(self.classes)

    def __getitem__(self, i):
        cls = np.kron(self.classes[i], np.ones((8, 8), np.int64))
        label = cls.copy()
        band = np.zeros(8, bool)
        band[[0, 1, 2, 5, 6, 7]] = True
        label[np.tile(band, 4)[:, None] | np.tile(band, 4)[None, :]] = 255
        return {"index": i, "image": torch.from_numpy(COLOURS[cls]).permute(2, 0, 1).contiguous(),
                "label": torch.from_numpy(label)}


SETTINGS = ProbeSettings(epochs=15, lr=0.1, batch_size=8, seed=0, cache_bytes=1e9)


def test_probe_learns_a_separable_toy_problem_to_100_percent():
    backbone = PatchColour()
    probe, history = train_probe(backbone, Toy(16, seed=1), 4, SETTINGS, "cpu")
    assert history[-1]["loss"] < history[0]["loss"]
    s = direct_scores(probe_confusion(backbone, probe, Toy(8, seed=2), 4, SETTINGS, "cpu"))
    assert s["miou"] == 100.0 and s["pixel_accuracy"] == 100.0


def test_direct_scores_are_unmatched_class_for_class():
    conf = np.array([[5, 1, 0], [0, 4, 0], [0, 0, 0]])  # rows predicted, columns ground truth; class 2 absent
    s = direct_scores(conf)
    assert s["miou"] == pytest.approx(100 * (5 / 6 + 4 / 5) / 2)  # class 2: neither labelled nor predicted: left out
    assert s["pixel_accuracy"] == pytest.approx(90.0)
    assert s["per_class_iou"][2] is None
    swapped = direct_scores(conf[[1, 0, 2]])  # a permuted prediction is not matched back
    assert swapped["miou"] == pytest.approx(100 * (0 / 10 + 1 / 10) / 2)
    assert swapped["pixel_accuracy"] == pytest.approx(10.0)
    predicted_only = direct_scores(np.array([[3, 0], [1, 0]]))  # class 1 predicted, never labelled: IoU 0, counted
    assert predicted_only["miou"] == pytest.approx(100 * (3 / 4 + 0) / 2)


def test_loss_is_cross_entropy_of_upsampled_logits_over_labelled_pixels():
    torch.manual_seed(0)
    probe = torch.nn.Conv2d(5, 3, 1)
    feats, labels = torch.randn(2, 5, 2, 2), torch.randint(0, 3, (2, 8, 8))
    labels[0, :3] = 255
    logits = torch.nn.functional.interpolate(probe(feats), size=(8, 8), mode="bilinear", align_corners=False)
    logp = torch.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 3)
    flat = labels.reshape(-1)
    keep = flat < 3
    expected = -logp[keep.nonzero()[:, 0], flat[keep]].mean()
    assert probe_loss(probe, feats, labels, 3).item() == pytest.approx(expected.item(), rel=1e-6)
    assert probe_loss(probe, feats, torch.full_like(labels, 255), 3) is None


@pytest.mark.parametrize("h, w, H, W", [(8, 8, 64, 64), (5, 7, 40, 21), (4, 4, 4, 4), (6, 3, 50, 33)])
def test_upsampling_by_matrices_is_bilinear_interpolation(h, w, H, W):
    z = torch.randn(2, 3, h, w, dtype=torch.float64)
    torch.testing.assert_close(upsample_bilinear(z, (H, W)),
                               torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False))


def test_features_in_memory_or_per_epoch_train_the_same_probe():
    backbone = PatchColour()
    a, _ = train_probe(backbone, Toy(12, seed=3), 4, ProbeSettings(3, 0.05, 8, 0, cache_bytes=1e9), "cpu")
    b, _ = train_probe(backbone, Toy(12, seed=3), 4, ProbeSettings(3, 0.05, 8, 0, cache_bytes=0), "cpu")
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y)


def test_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    backbone, data = PatchColour(), Toy(12, seed=4)
    full, history = train_probe(backbone, data, 4, ProbeSettings(3, 0.05, 8, 0, cache_bytes=1e9), "cpu")
    ckpt = tmp_path / "ckpt"
    train_probe(backbone, data, 4, ProbeSettings(1, 0.05, 8, 0, cache_bytes=1e9), "cpu", ckpt, "k")  # "killed"
    assert ckpt.is_file()
    resumed, resumed_history = train_probe(backbone, data, 4, ProbeSettings(3, 0.05, 8, 0, cache_bytes=1e9), "cpu",
                                           ckpt, "k")
    assert [r["epoch"] for r in resumed_history] == [0, 1, 2]
    assert [r["loss"] for r in resumed_history] == [r["loss"] for r in history]
    for x, y in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(x, y)
    other, _ = train_probe(backbone, data, 4, ProbeSettings(1, 0.05, 8, 0, cache_bytes=1e9), "cpu", ckpt, "other")
    assert not torch.equal(other.weight, resumed.weight)  # another key: not resumed (1 epoch from scratch)


def test_epoch_order_is_seeded_by_seed_and_epoch():
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert sorted(epoch_order(10, 0, 1)) == list(range(10))
    assert epoch_order(10, 0, 1) != epoch_order(10, 0, 2) and epoch_order(10, 0, 1) != epoch_order(10, 1, 1)


# -- the stage -------------------------------------------------------------------------------------------------
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 6, "n_val": 4, "size": 32}},
        "train": {"batch_size": 2}, "probe": {"epochs": 2, "batch_size": 4}}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("TRANSFGU_PARAMS", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")

    def write(over):
        params = default_params({"dataset": {"root": str(tmp_path / "data")}, **over})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return tmp_path
    return write


def test_stage_writes_the_linear_metrics(project):
    root = project(TINY)
    run_stage_here("prepare")
    run_stage_here("probe")
    metrics = json.loads((root / "outputs" / "probe_metrics.json").read_text())
    assert sorted(metrics) == ["linear_miou", "linear_pixel_accuracy"]
    assert 0 < metrics["linear_miou"] <= 100 and 0 < metrics["linear_pixel_accuracy"] <= 100
    assert not list((root / "outputs").glob(".probe_metrics.json.checkpoint-*"))  # removed once written
    saved = torch.load(root / "outputs" / "probe.pt", weights_only=True)  # the layer, with the classes it predicts
    assert saved["state_dict"]["weight"].shape[:2] == (6, 192) and len(saved["classes"]) == 6


def test_split_without_labels_is_one_line_and_no_probe_numbers(project, tmp_path, caplog):
    root = trees.make_folder(tmp_path / "unlabelled", labels=False)
    project({"granularity": 4, "dataset": {"name": "folder", "root": str(root), "R": 32, "n_things": 2},
             "train": {"batch_size": 2}, "probe": {"epochs": 1}})
    run_stage_here("prepare")
    with caplog.at_level(logging.INFO, logger="transfgu"):
        run_stage_here("probe")
    lines = [r.getMessage() for r in caplog.records if "no linear probe" in r.getMessage()]
    assert len(lines) == 1 and "the train and val splits have no labels" in lines[0], lines
    assert json.loads((tmp_path / "outputs" / "probe_metrics.json").read_text()) == {}
    saved = torch.load(tmp_path / "outputs" / "probe.pt", weights_only=True)
    assert saved["state_dict"] is None and "no labels" in saved["why_none"]


def test_disabled_probe_writes_no_numbers(project, tmp_path):
    project({**TINY, "probe": {"enabled": False}})
    run_stage_here("prepare")
    run_stage_here("probe")
    assert json.loads((tmp_path / "outputs" / "probe_metrics.json").read_text()) == {}


def test_dvc_params_leave_out_train_and_the_transfgu_stages():
    """Changing train.* (or any section of the TransFGU stages) does not re-run the probe; granularity does, as it
    fixes the label set (cocostuff 27 / 171, lip 5 / 16 / 19, synthetic 6 / 12)."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["probe"]
    params = [next(iter(p)) if isinstance(p, dict) else p for p in stage["params"]]
    train_keys = ["train"] + [f"train.{k}" for k in default_params()["train"]]
    for p in params:
        assert not any(k == p or k.startswith(p + ".") or p.startswith(k + ".") for k in train_keys), p
        assert p.split(".")[0] not in ("extract", "cluster", "pseudo", "train", "evaluate"), p
    assert "granularity" in params and "probe" in params and "backbone" in params
    data_deps = [d for d in stage["deps"] if not d.endswith(".py")]
    assert data_deps == ["outputs/index.json"]
    assert [next(iter(m)) for m in stage["metrics"]] == ["outputs/probe_metrics.json"]


@pytest.mark.slow  # spawns the stage as processes, one of them killed
def test_stage_killed_after_an_epoch_resumes_to_the_same_metrics(tmp_path):
    import sys
    from tiny_project import copy_project, run
    root = copy_project(tmp_path, default_params({**TINY, "dataset": {**TINY["dataset"], "root": "data/synthetic"},
                                                  "probe": {"epochs": 3, "batch_size": 4}}), code=("stages",))
    run([sys.executable, "stages/prepare.py"], root)
    run([sys.executable, "stages/probe.py"], root)
    out = root / "outputs" / "probe_metrics.json"
    reference = out.read_bytes()
    out.unlink()
    killed = run([sys.executable, "stages/probe.py"], root, check=False, TRANSFGU_FAULT="probe:2")
    assert killed.returncode != 0 and "TRANSFGU_FAULT=probe:2: SIGKILL" in killed.stderr
    (checkpoint,) = (root / "outputs").glob(".probe_metrics.json.checkpoint-*")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2 and not out.exists()
    resumed = run([sys.executable, "stages/probe.py"], root)
    assert "resuming from" in resumed.stderr and "2 of 3 epochs done" in resumed.stderr
    assert out.read_bytes() == reference
    assert not list((root / "outputs").glob(".probe_metrics.json.checkpoint-*"))
