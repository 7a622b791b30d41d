"""The per-stage knobs every network stage resolves through transfgu.stage.Stage: precision and DataLoader
workers."""
from pathlib import Path

import pytest
import torch
import yaml

from transfgu import stage as stage_module
from transfgu.config import validate_params
from transfgu.stage import Stage, stage_spec

REPO = Path(__file__).resolve().parent.parent


def stage_with(name, device="cpu", **section):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data[name].update(section)
    s = Stage(name, validate_params(data), stage_spec(name, REPO / "dvc.yaml"))
    s.device = torch.device(device)
    return s


def test_workers_auto_is_none_on_the_cpu_and_up_to_eight_per_gpu_process(monkeypatch):
    assert stage_with("pseudo", num_workers="auto").workers() == 0
    assert stage_with("pseudo", num_workers=3).workers() == 3
    monkeypatch.setattr(stage_module.os, "cpu_count", lambda: 32)
    assert stage_with("train", "cuda:0", num_workers="auto").workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert stage_with("train", "cuda:0", num_workers="auto").workers() == 4
    monkeypatch.setattr(stage_module.os, "cpu_count", lambda: 4)
    assert stage_with("train", "cuda:0", num_workers="auto").workers() == 1


def test_precision_param():
    assert stage_with("extract", precision="auto").precision() == "fp32"
    assert stage_with("extract", "cuda:0", precision="auto").precision() == "bf16"
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["pseudo"]["precision"]  # pseudo's default is fp32, also on a GPU
    s = Stage("pseudo", validate_params(data), stage_spec("pseudo", REPO / "dvc.yaml"))
    s.device = torch.device("cuda:0")
    assert s.precision() == "fp32"


def test_stage_spec_is_dvc_yaml():
    """A stage's params, files and code come from dvc.yaml, nowhere else."""
    spec = stage_spec("pseudo", REPO / "dvc.yaml")
    assert "granularity" in spec.params and "pseudo" in spec.params and "train" not in spec.params
    assert spec.path("centroids.npz") == Path("outputs/centroids.npz")
    assert spec.path("pseudo_masks.h5") == Path("outputs/pseudo_masks.h5")
    assert spec.reads("index.json") and not spec.reads("pseudo_masks.h5")  # an out, not a dep
    assert not stage_spec("prepare", REPO / "dvc.yaml").reads("index.json")
    assert ("stages/pseudo.py", Path("stages/pseudo.py")) in spec.code
    assert all(name.endswith(".py") for name, _ in spec.code)
    with pytest.raises(KeyError, match="declares no dep or out named decoder.pt"):
        spec.path("decoder.pt")
    evaluate = stage_spec("evaluate", REPO / "dvc.yaml")
    assert evaluate.path("metrics.json") == Path("outputs/metrics.json")  # metrics and plots count as outs
    assert evaluate.path("per_class_iou.csv") == Path("outputs/per_class_iou.csv")
