"""The per-stage knobs read by stages/runtime.py: precision and DataLoader workers."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "stages"))
    import runtime
    monkeypatch.setattr(runtime, "device", lambda: __import__("torch").device("cpu"))
    return runtime


def test_workers_auto_is_none_on_the_cpu_and_up_to_eight_per_gpu_process(common, monkeypatch):
    assert common.workers_of({"pseudo": {"num_workers": "auto"}}, "pseudo") == 0
    assert common.workers_of({"pseudo": {}}, "pseudo") == 0
    assert common.workers_of({"pseudo": {"num_workers": 3}}, "pseudo") == 3
    import torch
    monkeypatch.setattr(common, "device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(common.os, "cpu_count", lambda: 32)
    assert common.workers_of({"train": {"num_workers": "auto"}}, "train") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.workers_of({"train": {"num_workers": "auto"}}, "train") == 4
    monkeypatch.setattr(common.os, "cpu_count", lambda: 4)
    assert common.workers_of({"train": {"num_workers": "auto"}}, "train") == 1


@pytest.mark.parametrize("value", [-1, "four", 2.5, True])
def test_bad_worker_count_names_the_param(common, value):
    with pytest.raises(SystemExit, match=r"evaluate.num_workers: expected 'auto' or an integer >= 0"):
        common.workers_of({"evaluate": {"num_workers": value}}, "evaluate")


def test_precision_param(common):
    assert common.precision_of({"extract": {"precision": "auto"}}, "extract", "cpu") == "fp32"
    assert common.precision_of({"extract": {}}, "extract", "cuda") == "bf16"
    assert common.precision_of({"pseudo": {}}, "pseudo", "cuda", default="fp32") == "fp32"
    with pytest.raises(SystemExit, match=r"params.yaml: train.precision: expected one of auto, fp32, bf16, got 'half'"):
        common.precision_of({"train": {"precision": "half"}}, "train", "cpu")
