"""The benchmark script's --quick mode runs and reports every field (no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_quick_benchmark_prints_one_json_line_per_stage():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--repeats", "1",
                          "--stages", "pseudo27", "train"], capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["stage"] for r in rows] == ["pseudo27", "train"]
    for r in rows:
        assert {"img_per_s", "baseline_img_per_s", "speedup", "peak_mem_mb", "device"} <= r.keys()
        assert r["img_per_s"] > 0 and r["baseline_img_per_s"] > 0
        assert abs(r["speedup"] - r["img_per_s"] / r["baseline_img_per_s"]) < 0.01 * r["speedup"] + 0.01


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_quick_benchmark_reports_storage_loading_and_cluster_backend():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--repeats", "1",
                          "--stages", "pseudo171_bf16", "pieces", "load_train", "cluster",
                          "--cluster-backend", "torch"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r["stage"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["pseudo171_bf16"]["precision"] == "bf16" and rows["pseudo171_bf16"]["concepts"] == 171
    assert 0 < rows["pseudo171_bf16"]["stored_mb_per_image"] < 1
    assert rows["pieces"]["ms_per_batch"] > 0 and rows["pieces"]["disk_kb_per_batch"] > 0  # PieceWriter + merge
    assert rows["load_train"]["workers"] == 2 and rows["load_train"]["img_per_s"] > 0
    assert rows["cluster"]["backend"] == "torch on cpu" and rows["cluster"]["baseline"] == "faiss-cpu"


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_quick_benchmark_extract_and_cut():
    """extract and extract_cut: the batched cut equals the per-window slice + F.interpolate on the same boxes."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--repeats", "1",
                          "--stages", "extract", "extract_cut"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r["stage"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert list(rows) == ["extract", "extract_cut"]
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["baseline_img_per_s"] > 0 and r["speedup"] > 0
    assert rows["extract"]["crops_per_image"] > 0 and rows["extract"]["precision"] == "fp32"
    cut = rows["extract_cut"]
    assert cut["crops_per_image"] == 98 and cut["crop_px"] == 32  # quick: R = 32, an 8 x 8 grid
    assert cut["max_abs_diff"] <= 1e-5


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_quick_benchmark_without_baselines_for_the_gpu_table():
    """--no-baseline (what benchmarks/gpu.sh runs): baseline fields null; evaluate times forward + upsample +
    argmax + confusion; --train-batch sets the train step's batch; --tf32 is recorded, and the fp32 pseudo line
    reports the pseudo labels' agreement with TF32 on and off (1.0 on the CPU, which has no TF32)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--repeats", "1",
                          "--no-baseline", "--train-batch", "6", "--tf32", "off",
                          "--stages", "evaluate", "train", "pseudo27", "extract"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r["stage"]: r for r in map(json.loads, out.stdout.splitlines())}
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["baseline_img_per_s"] is None and r["speedup"] is None
        assert r["tf32"] == "off" and "tf32_matmul" in r and "tf32_cudnn" in r
    assert rows["evaluate"]["measures"] == "forward+upsample+argmax+confusion" and rows["evaluate"]["batch"] == 8
    assert rows["train"]["batch"] == 6 and rows["train"]["bootstrap"] and rows["train"]["augment_on"] == "cpu"
    assert rows["pseudo27"]["tf32_label_agreement"] == 1.0
    assert rows["extract"]["batch"] == 2 and rows["extract"]["crops_per_s"] > 0


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_quick_benchmark_device_jpeg_decode():
    """load_device_decode: JPEG bytes read by the workers, decoded by torchvision on the bench device and resized
    to R (antialiased): within a fraction of a uint8 level of the pipeline's PIL images."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--repeats", "1",
                          "--stages", "load_device_decode"], capture_output=True, text=True, timeout=300, check=True)
    (row,) = map(json.loads, out.stdout.splitlines())
    assert row["img_per_s"] > 0 and row["baseline_img_per_s"] > 0 and row["size"] == 32
    assert row["mean_abs_diff"] < 1.0


def test_cluster_baseline_without_faiss_says_so(monkeypatch):
    """On a machine without faiss (the GPU machine without its wheel) the torch k-means line still runs, with no
    baseline time and a `baseline` field that says why."""
    import bench
    from transfgu import cluster
    monkeypatch.setattr(cluster, "faiss", None)
    monkeypatch.setattr(bench, "BASELINES", True)
    import torch
    sizes = {**bench.SIZES["quick"], "cluster": (2_000, 16, 8, 3)}
    new, old, extra = bench.bench_cluster(sizes, torch.device("cpu"), 1, backend="torch")
    assert new > 0 and old is None
    assert extra["baseline"] == "faiss-cpu: not installed here" and extra["baseline_seconds"] is None
    assert extra["backend"] == "torch on cpu" and extra["iterations"] == 3
