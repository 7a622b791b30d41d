"""What the train stage shows while it runs: dvclive's points (transfgu/live.py LiveLog) and the epoch log line."""
import csv
import json
import sys
from pathlib import Path

import pytest

from transfgu import live
from transfgu.train import format_epoch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def train_stage(monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)  # run by hand, inside this DVC project
    return live


def tsv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def test_live_log_points_per_tenth_of_an_epoch_and_per_epoch(train_stage, tmp_path):
    """25 steps per epoch: a training-loss point every 2 steps (the mean of those steps), the epoch's leftover
    step at its end, then the epoch and its val scores at the same step; the summary holds the latest."""
    live = train_stage.LiveLog(tmp_path / "dvclive", steps_per_epoch=25)
    for epoch in range(2):
        for i in range(25):
            live.on_step(epoch, {"loss": float(100 * epoch + i), "loss_cat": 0.0, "loss_uncertainty": 0.0,
                                 "loss_cls_emb": 0.0})
        live.on_epoch({"epoch": epoch, "loss": 1.0, "val_miou": 10.0 + epoch, "val_pixel_accuracy": 50.0 + epoch})
    live.end()
    loss = tsv(tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv")
    steps = [int(r["step"]) for r in loss]
    assert steps == [*range(2, 25, 2), 25, *range(27, 50, 2), 50]
    assert loss[0]["loss"] == 0.5 and loss[12]["loss"] == 24.0 and loss[13]["loss"] == 100.5  # means of the windows
    miou = tsv(tmp_path / "dvclive" / "plots" / "metrics" / "val" / "miou.tsv")
    assert [(int(r["step"]), r["miou"]) for r in miou] == [(25, 10.0), (50, 11.0)]
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary == {"train": {"loss": 124.0}, "step": 50, "epoch": 1, "val": {"miou": 11.0, "pixel_accuracy": 51.0}}
    assert not (tmp_path / "dvc.yaml").exists()


def test_live_log_without_validation_logs_no_val_files(train_stage, tmp_path):
    live = train_stage.LiveLog(tmp_path / "dvclive", steps_per_epoch=3)
    for i in range(3):
        live.on_step(0, {"loss": 1.0})
    live.on_epoch({"epoch": 0, "loss": 1.0})
    live.end()
    assert json.loads((tmp_path / "dvclive" / "metrics.json").read_text()) == {"train": {"loss": 1.0}, "step": 3,
                                                                              "epoch": 0}
    assert not (tmp_path / "dvclive" / "plots" / "metrics" / "val").exists()


def test_epoch_line_is_readable():
    row = {"epoch": 2, "loss": 3.33864, "loss_cat": 1.988, "loss_uncertainty": 0.82684, "loss_cls_emb": 1.10256,
           "bootstrapping": True, "handover": True, "val_miou": 14.66064, "val_pixel_accuracy": 36.58854,
           "seconds": 13.3201}
    assert format_epoch(row, 12) == ("epoch 2 (3/12): loss 3.3386 (cat 1.9880, uncertainty 0.8268, cls_emb 1.1026); "
                                     "val miou 14.66, pixel accuracy 36.59; bootstrapping, teacher hand-over; 13.3 s")
    first = {k: v for k, v in row.items() if not k.startswith("val")} | {"epoch": 0, "bootstrapping": False}
    assert format_epoch(first) == "epoch 0: loss 3.3386 (cat 1.9880, uncertainty 0.8268, cls_emb 1.1026); 13.3 s"


def test_train_stage_without_dvclive_warns_once_and_logs_nothing(train_stage, tmp_path, monkeypatch, caplog):
    """dvclive is optional (e.g. a GPU machine without it): open_live gives None with one warning, and the
    stage's callbacks do nothing (train_log.csv is written by the stage itself, from the history)."""
    monkeypatch.setitem(sys.modules, "dvclive", None)  # `from dvclive import Live` raises ImportError
    with caplog.at_level("WARNING", logger="transfgu"):
        live = train_stage.LiveLog(tmp_path / "dvclive", steps_per_epoch=3)
        for i in range(3):
            live.on_step(0, {"loss": 1.0})
        live.on_epoch({"epoch": 0, "loss": 1.0, "val_miou": 1.0, "val_pixel_accuracy": 2.0})
        live.end()
    assert live.live is None and not (tmp_path / "dvclive").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dvclive is not installed" in warnings[0] and "train_log.csv" in warnings[0]


def test_live_log_is_off_outside_a_dvc_project(train_stage, tmp_path, monkeypatch, caplog):
    """Run by hand outside any DVC project, dvclive would `dvc init` the git repository it finds: no live log
    (one info line), and nothing written."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="transfgu"):
        live = train_stage.LiveLog(tmp_path / "dvclive", steps_per_epoch=3)
    live.on_step(0, {"loss": 1.0})
    live.end()
    assert live.live is None and not (tmp_path / "dvclive").exists() and not (tmp_path / ".dvc").exists()
    assert any("not inside a DVC project" in r.getMessage() for r in caplog.records)
