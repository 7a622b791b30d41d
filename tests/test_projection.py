"""benchmarks/projection.py (target table, full-run projection, the stage check) on hand-made bench lines, and
benchmarks/gpu.sh: syntax, a --quick run of two lines, and its loud failures (fake interpreter, no torch)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
import projection

CARD = "NVIDIA H100 80GB HBM3"
ROWS = [
    {"stage": "pseudo171", "img_per_s": 400.0, "batch": 8, "device": CARD, "tf32": "default",
     "tf32_label_agreement": 0.95},
    {"stage": "pseudo171_bf16", "img_per_s": 900.0, "device": CARD},
    {"stage": "evaluate", "img_per_s": 1200.0, "device": CARD},
    {"stage": "train", "img_per_s": 2500.0, "batch": 256, "device": CARD},
    {"stage": "extract", "img_per_s": 40.0, "crops_per_s": 2400.0, "crops_per_image": 60.0, "device": CARD},
    {"stage": "train", "img_per_s": 1000.0, "batch": 32, "device": CARD},
    {"stage": "load_pseudo", "img_per_s": 1000.0, "device": CARD},
    {"stage": "load_extract", "img_per_s": 20.0, "device": CARD},
    {"stage": "load_train", "img_per_s": 1500.0, "device": CARD},
    {"stage": "cluster", "img_per_s": 5e6, "seconds": 100.0, "vectors": 5_000_000, "iterations": 100, "dim": 384,
     "k": 171, "backend": "torch on cuda", "device": CARD},
    {"stage": "pseudo171", "img_per_s": 700.0, "batch": 8, "device": CARD, "tf32": "on", "tf32_label_agreement": 0.97},
    {"stage": "pseudo171", "img_per_s": 500.0, "batch": 32, "device": CARD, "tf32": "default",
     "tf32_label_agreement": 0.96},
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_projection_arithmetic(jsonl):
    rows = projection.load_rows(jsonl)
    p = projection.project(rows, n_train=118_287, n_val=5_000, epochs=200, train_batch=32, niter=100)
    s = p["seconds"]
    assert s["extract"] == pytest.approx(118_287 / 20)  # the loader (20 img/s) bounds extract (40)
    assert p["notes"]["vectors"] == pytest.approx(60 * 118_287)
    assert s["cluster"] == pytest.approx(100 * 60 * 118_287 / 5_000_000)  # linear in the vectors
    assert s["pseudo"] == pytest.approx(118_287 / 500)  # fp32 171 concepts at the pipeline's batch 32
    assert p["notes"]["pseudo_batch"] == 32
    assert projection.project(rows, pseudo_batch=8)["seconds"]["pseudo"] == pytest.approx(118_287 / 400)
    assert s["evaluate"] == pytest.approx(5_000 / 1000)  # load_pseudo (1000) bounds evaluate (1200)
    assert s["train"] == pytest.approx(200 * (118_287 / 1000 + 5_000 / 1000))  # batch 32 line, val each epoch
    assert p["notes"]["train_batch"] == 32
    # twice the iterations, twice the k-means time; the train line at batch 256 when asked for it
    assert projection.project(rows, niter=200)["seconds"]["cluster"] == pytest.approx(2 * s["cluster"])
    p256 = projection.project(rows, train_batch=256)
    assert p256["seconds"]["train"] == pytest.approx(200 * (118_287 / 1500 + 5_000 / 1000))  # load_train bounds
    # a k-means measured at other sizes scales with vectors x dim x centres x iterations
    small = [r for r in rows if r["stage"] != "cluster"] + [
        {"stage": "cluster", "img_per_s": 1.0, "seconds": 2.0, "vectors": 20_000, "dim": 64, "k": 16, "iterations": 10}]
    assert projection.project(small)["seconds"]["cluster"] == pytest.approx(
        2.0 * (60 * 118_287 / 20_000) * (384 / 64) * (171 / 16) * (100 / 10))


def test_projection_line_and_missing_stages(jsonl):
    rows = projection.load_rows(jsonl)
    line = projection.projection_line(rows, projection.project(rows))
    assert line == (f"full COCO-Stuff-171 run on one {CARD}: extract 1.64 h, cluster 2.4 min, pseudo 3.9 min, "
                    f"train 6.85 h (200 epochs), evaluate 0.1 min")
    only = [r for r in rows if r["stage"] == "pseudo171" and r["batch"] == 8]
    line = projection.projection_line(only, projection.project(only))
    assert line.endswith("extract n/a, cluster n/a, pseudo 4.9 min, train n/a (200 epochs), evaluate n/a")


def test_target_table_statuses(jsonl):
    table = {line: (value, target, status) for line, value, target, status in
             projection.target_table(projection.load_rows(jsonl))}
    assert table["pseudo masks fp32, 27 concepts"][2] == "missing"
    assert table["pseudo masks fp32, 171 concepts"] == (400.0, ">= 300", "ok")
    assert table["pseudo masks bf16, 171 concepts"] == (900.0, ">= 800", "ok")
    # the --tf32 on line has its own row; the fp32 line and the projection use the default one
    assert table["pseudo masks fp32 + TF32 (--tf32 on), 171"] == (700.0, ">= 300", "ok")
    assert table["pseudo fp32 171: labels same with TF32 on"] == (0.95, ">= 0.9", "ok")
    assert table["pseudo masks fp32, 171, batch 32 (pipeline)"] == (500.0, ">= 300", "ok")
    assert table["train step, bootstrap + device augment, b256"] == (2500.0, ">= 2,000", "ok")
    assert table["k-means 5M x 384 -> 171, 100 iterations (s)"] == (100.0, "<= 120", "ok")
    assert table["extract crops"] == (2400.0, ">= 2,000", "ok")
    assert table["load extract (JPEG -> 2R) >= extract"] == (20.0, ">= 40", "BELOW")
    assert table["load train (JPEG + HDF5 maps) >= train"] == (1500.0, ">= 2,500", "BELOW")  # fastest train line
    assert table["load pseudo/evaluate (JPEG -> R) >= them"] == (1000.0, ">= 1,200", "BELOW")


def test_baseline_column_and_speedups():
    """The baseline column: a line's own baseline, else its stage's last one (bf16 pseudo: the fp32 stage's, the
    same per-concept loop); crops/s from the baseline's images/s x crops per image; k-means in seconds (speedup =
    baseline / measured); nothing for agreements or where no row measured a baseline."""
    rows = [dict(r) for r in ROWS]
    for r in rows:
        if r["stage"] == "pseudo171" and r["batch"] == 8 and r["tf32"] == "default":
            r["baseline_img_per_s"] = 25.0
        if r["stage"] == "extract":
            r["baseline_img_per_s"] = 5.0
        if r["stage"] == "cluster":
            r.update(baseline="faiss-cpu", baseline_seconds=400.0)
    col = projection.baseline_column(rows)
    assert col["pseudo masks fp32, 171 concepts"] == (25.0, pytest.approx(16.0))
    assert col["pseudo masks fp32, 171, batch 32 (pipeline)"] == (25.0, pytest.approx(20.0))  # no own baseline
    assert col["pseudo masks bf16, 171 concepts"] == (25.0, pytest.approx(36.0))
    assert col["pseudo masks bf16, 27 concepts"] == (None, None) and col["evaluate: forward+upsample+argmax+confusion"] == (None, None)
    assert col["pseudo fp32 171: labels same with TF32 on"] == (None, None)
    assert col["extract (images at 2R, crops at R)"] == (5.0, pytest.approx(8.0))
    assert col["extract crops"] == (pytest.approx(300.0), pytest.approx(8.0))
    assert col["k-means 5M x 384 -> 171, 100 iterations (s)"] == (400.0, pytest.approx(4.0))

    class Args:
        train_images, val_images, epochs, train_batch, niter, pseudo_batch = 118_287, 5_000, 200, 32, 100, 32
    report = projection.report(rows, Args)
    (line,) = [x for x in report.splitlines() if x.startswith("pseudo masks fp32, 171 concepts")]
    assert line.split()[-6:] == ["400.0", "25.0", "16.00x", ">=", "300", "ok"]
    assert "k-means: faiss-cpu)" in report


def test_check_rejects_missing_nan_and_zero_rates():
    assert projection.check(ROWS, "cluster") is None and projection.check(ROWS, "extract") is None
    assert projection.check([{"stage": "pseudo171", "img_per_s": 5.0, "tf32": "on"}], "pseudo171") is None
    assert "no JSON line" in projection.check(ROWS, "pseudo27")
    assert "img_per_s=nan" in projection.check([{"stage": "evaluate", "img_per_s": math.nan}], "evaluate")
    assert "img_per_s=0" in projection.check([{"stage": "evaluate", "img_per_s": 0}], "evaluate")
    assert "crops_per_s" in projection.check([{"stage": "extract", "img_per_s": 3.0, "crops_per_s": 0.0}], "extract")


def test_cli_report_and_check(jsonl):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "benchmarks" / "projection.py"), str(jsonl), *a],  # noqa: E731
                                    capture_output=True, text=True)
    out = run("--train-batch", "32")
    assert out.returncode == 0 and out.stdout.splitlines()[-3].startswith(f"full COCO-Stuff-171 run on one {CARD}")
    assert "118,287 train / 5,000 val" in out.stdout
    assert run("--check", "cluster").returncode == 0
    bad = run("--check", "pseudo27")
    assert bad.returncode == 1 and "FAILED: no JSON line for stage pseudo27" in bad.stderr


GPU_SH = REPO / "benchmarks" / "gpu.sh"


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_gpu_sh_syntax():
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True)


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_gpu_sh_quick_two_lines(tmp_path):
    """The --quick path end to end on two lines: JSON lines, log, per-line times and the final table."""
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out"), "--quick"], capture_output=True, text=True,
                         timeout=300, env=_env(PYTHON=sys.executable, GPU_SH_ONLY="pseudo_fp32 cluster"))
    assert out.returncode == 0, out.stderr
    rows = projection.load_rows(tmp_path / "out" / "bench.jsonl")
    assert [r["stage"] for r in rows] == ["pseudo171", "pseudo27", "cluster"]  # a line can run several stages
    assert all(r["baseline_img_per_s"] > 0 for r in rows)  # main lines measure their baseline in the same run
    assert (tmp_path / "out" / "log").read_text().count("## pseudo_fp32") >= 2
    assert "full COCO-Stuff-171 run on one cpu" in out.stdout
    table = (tmp_path / "out" / "table.txt").read_text()
    assert table in out.stdout and "not measured" not in table
    (fp32_27,) = [line for line in table.splitlines() if line.startswith("pseudo masks fp32, 27 concepts")]
    assert f"{rows[1]['img_per_s'] / rows[1]['baseline_img_per_s']:.2f}x" in fp32_27


def test_gpu_sh_variant_lines_skip_the_baseline():
    """Option and variant lines pass --no-baseline (their baseline is their main line's); main lines do not."""
    text = GPU_SH.read_text()
    lines = {e.split("|")[0].strip(' "'): e for e in text[text.index("LINES=("):text.index(")\n", text.index("LINES=("))]
             .splitlines()[1:]}
    with_baseline = {n for n, e in lines.items() if "$NB" not in e}
    assert with_baseline == {"pseudo_fp32", "evaluate", "train_target", "extract", "load_host", "cluster"}


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_gpu_sh_budget_skips_lines_instead_of_failing(tmp_path):
    """GPU_SH_BUDGET: the line running when it is spent is stopped and, with every line after it, listed as not
    measured; the script still writes the table of what it measured and exits 0."""
    py = tmp_path / "fakepython"
    py.write_text('#!/usr/bin/env bash\nif [[ $1 == benchmarks/bench.py ]]; then\n'
                  '  if [[ " $* " == *" pseudo171_bf16 "* ]]; then\n'
                  '    echo \'{"stage": "pseudo171_bf16", "img_per_s": 900.0, "device": "fake card"}\'\n'
                  '    echo \'{"stage": "pseudo27_bf16", "img_per_s": 950.0, "device": "fake card"}\'\n'
                  f'  else sleep 60; fi\nelse exec {sys.executable} "$@"; fi\n')
    py.chmod(0o755)
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=60, env=_env(PYTHON=str(py), GPU_SH_BUDGET="8"))
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "900.0" in table and "full COCO-Stuff-171 run on one fake card" in table
    (skipped,) = [line for line in table.splitlines() if line.startswith("not measured")]
    assert skipped.startswith("not measured (GPU_SH_BUDGET=8 s spent): pseudo_fp32 evaluate train_target ")
    assert skipped.endswith(" pseudo171_tf32")
    log = (tmp_path / "out" / "log").read_text()
    assert "## pseudo_fp32: stopped after" in log and "## evaluate: skipped, budget spent" in log


@pytest.mark.parametrize("fake, message", [
    ('echo boom >&2; exit 3', "FAILED: pseudo_bf16 (bench.py --stages pseudo171_bf16 pseudo27_bf16 exited non-zero"),
    ('echo \'{"stage": "pseudo171_bf16", "img_per_s": NaN}\'', "FAILED: pseudo_bf16 (stage pseudo171_bf16: no finite"),
])
@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_gpu_sh_fails_loudly_with_the_stage_name(tmp_path, fake, message):
    """A bench.py that errors, or prints a NaN rate, stops the script with the line's name (exit 1)."""
    py = tmp_path / "fakepython"
    py.write_text(f'#!/usr/bin/env bash\nif [[ $1 == benchmarks/bench.py ]]; then {fake}; '
                  f'else exec {sys.executable} "$@"; fi\n')
    py.chmod(0o755)
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out"), "--quick"], capture_output=True, text=True,
                         timeout=120, env=_env(PYTHON=str(py)))
    assert out.returncode == 1 and message in out.stderr
    # nothing measured: no table; a NaN line is kept in bench.jsonl and the table shows it as missing
    assert ("full COCO-Stuff-171" in out.stdout) == ("NaN" in fake)


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_gpu_sh_failure_after_a_line_still_prints_its_table(tmp_path):
    """A line that fails after others succeeded, itself after one of its stages printed its line: the table of
    everything measured (that stage included), then FAILED with the line's name and stages."""
    py = tmp_path / "fakepython"
    py.write_text('#!/usr/bin/env bash\nif [[ $1 == benchmarks/bench.py ]]; then\n'
                  '  if [[ " $* " == *" pseudo171_bf16 "* ]]; then\n'
                  '    echo \'{"stage": "pseudo171_bf16", "img_per_s": 900.0, "device": "fake card"}\'\n'
                  '    echo \'{"stage": "pseudo27_bf16", "img_per_s": 950.0, "device": "fake card"}\'\n'
                  '  elif [[ " $* " == *" pseudo171 "* ]]; then\n'
                  '    echo \'{"stage": "pseudo171", "img_per_s": 250.0, "batch": 8, "device": "fake card"}\'; exit 3\n'
                  f'  else exit 3; fi\nelse exec {sys.executable} "$@"; fi\n')
    py.chmod(0o755)
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120, env=_env(PYTHON=str(py)))
    assert out.returncode == 1 and "FAILED: pseudo_fp32 (bench.py --stages pseudo171 pseudo27 exited" in out.stderr
    assert "full COCO-Stuff-171 run on one fake card" in out.stdout
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "900.0" in table and "950.0" in table and "250.0" in table


def test_projection_with_device_decode_uses_the_device_loaders(jsonl):
    """The second projection line (decode: device) takes the device loaders' rates, and says n/a for a stage whose
    device loader was not measured rather than falling back to its compute rate."""
    rows = projection.load_rows(jsonl)
    device = rows + [{"stage": "load_train_device", "img_per_s": 800.0, "device": CARD},
                     {"stage": "load_device_decode", "img_per_s": 3000.0, "device": CARD}]
    p = projection.project(device, train_batch=32, loaders=projection.DEVICE_LOADERS)
    s = p["seconds"]
    assert s["train"] == pytest.approx(200 * (118_287 / 800 + 5_000 / 1000))  # load_train_device bounds train
    assert s["pseudo"] == pytest.approx(118_287 / 500)  # the device decode (3000) is faster than pseudo (500)
    assert s["extract"] is None and "no load_extract_device line" in p["notes"]["extract"]

    class Args:
        train_images, val_images, epochs, train_batch, niter, pseudo_batch = 118_287, 5_000, 200, 32, 100, 32
    assert "with decode: device" not in projection.report(rows, Args)
    report = projection.report(device, Args)
    assert f"full COCO-Stuff-171 run on one {CARD} with decode: device: extract n/a" in report


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel holding gpushprobe.VALUE = 42."""
    import zipfile
    path = folder / "gpushprobe-0.1-py3-none-any.whl"
    info = "gpushprobe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpushprobe.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpushprobe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"gpushprobe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_gpu_sh_installs_carried_wheels_for_the_run(tmp_path):
    """GPU_SH_WHEELS: its wheels are importable by every bench.py process of the run (here a fake bench that
    reports a value read from the installed module), installed nowhere but a temporary folder; a folder without
    wheels is refused before anything runs."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels)
    py = tmp_path / "fakepython"
    probe = ("import gpushprobe, json; [print(json.dumps({'stage': s, 'img_per_s': float(gpushprobe.VALUE), "
             "'device': 'fake card'})) for s in ('pseudo171_bf16', 'pseudo27_bf16')]")
    py.write_text(f'#!/usr/bin/env bash\nif [[ $1 == benchmarks/bench.py ]]; then exec {sys.executable} -c "{probe}"; '
                  f'else exec {sys.executable} "$@"; fi\n')
    py.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env=_env(PYTHON=str(py), GPU_SH_ONLY="pseudo_bf16", GPU_SH_WHEELS=str(wheels),
                                  TMPDIR=str(tmp_path / "tmp")))
    assert out.returncode == 0, out.stderr
    rows = projection.load_rows(tmp_path / "out" / "bench.jsonl")
    assert [r["img_per_s"] for r in rows] == [42.0, 42.0]
    assert "# wheels: gpushprobe-0.1-py3-none-any.whl" in (tmp_path / "out" / "log").read_text()
    assert not list((tmp_path / "tmp").iterdir())  # the install lived in the run's temporary folder, now gone
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(["bash", str(GPU_SH), str(tmp_path / "out2")], capture_output=True, text=True, timeout=60,
                         env=_env(PYTHON=str(py), GPU_SH_WHEELS=str(empty)))
    assert out.returncode == 2 and f"GPU_SH_WHEELS={empty}: no .whl file there" in out.stderr
    assert not (tmp_path / "out2" / "bench.jsonl").read_text()
