"""Strict inputs: params.yaml and classes.yaml are checked before any work, and every expected bad input
(params, missing files, unreadable images, wrong checkpoints, a full disk) ends a stage with one line naming the
file or key, exit status 2, no traceback, and no output file changed."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dataset_trees as trees
from tiny_project import copy_project, default_params, run_stage_here


# The params.yaml and classes.yaml checks themselves, in-process: tests/test_config.py.

# -- through the stage scripts, as dvc runs them -------------------------------------------------------------
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 8, "n_val": 4, "size": 64}},
        "extract": {"batch_size": 4, "crop_batch": 64}, "pseudo": {"batch_size": 4},
        "train": {"epochs": 1, "batch_size": 4}, "evaluate": {"batch_size": 4, "n_pictures": 1}}


@pytest.fixture(scope="module")
def prepared_base(tmp_path_factory):
    """A tiny synthetic project after `prepare`, made once; each test works on a copy."""
    root = tmp_path_factory.mktemp("inputs") / "project"
    copy_project(root, default_params(TINY))
    proc = stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture()
def prepared(prepared_base, tmp_path):
    return Path(shutil.copytree(prepared_base, tmp_path / "project", symlinks=True))


def set_params(root, **changes):
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in changes.items():
        node, keys = params, dotted.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(root, name, *extra):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, f"stages/{name}.py", *extra], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def snapshot(root) -> dict:
    """The artifacts under outputs/ (hidden work folders of interrupted stages left out) and their content."""
    out = root / "outputs"
    return {str(p.relative_to(out)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not str(p.relative_to(out)).startswith(".")} \
        if out.is_dir() else {}


def assert_one_line_failure(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.mark.parametrize("name, key, value, needles", [
    ("prepare", "train.epoch", 3, ["params.yaml: unknown key train.epoch: did you mean train.epochs?"]),
    ("cluster", "pseudo.mass", 2, ["params.yaml: pseudo.mass: expected a number > 0 and <= 1, got 2"]),
    ("prepare", "backbone.checkpoint", "weight/missing.pth", ["backbone.checkpoint: weight/missing.pth does not "
                                                              "exist"]),
    ("prepare", "train.batch_size", 9, ["train.batch_size 9 is larger than the 8 train images"]),
    ("extract", "train.batch_size", 9, ["train.batch_size 9 is larger than the 8 train images"]),
])
@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_bad_params_stop_a_stage_before_any_work(prepared, name, key, value, needles):
    before = snapshot(prepared)
    set_params(prepared, **{key: value})
    proc = stage(prepared, name)
    assert_one_line_failure(proc, *needles)
    assert snapshot(prepared) == before


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_wrong_checkpoint_is_one_line(prepared):
    import torch
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 7)}}, prepared / "wrong.pth")
    set_params(prepared, **{"backbone.checkpoint": "wrong.pth"})
    before = snapshot(prepared)
    assert_one_line_failure(stage(prepared, "extract"), "wrong.pth: does not match backbone vit_mini/8")
    assert snapshot(prepared) == before


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_unreadable_image_is_one_line_without_traceback(prepared):
    image = sorted((prepared / "data/synthetic/images/train").iterdir())[3]
    trees.truncate(image)
    before = snapshot(prepared)
    proc = stage(prepared, "extract")
    assert_one_line_failure(proc, f"cannot read image {image.relative_to(prepared)}")
    assert "`dataset.skip_bad: true` makes prepare leave unreadable images out" in proc.stderr
    assert snapshot(prepared) == before
    assert not list((prepared / "outputs").glob(".feature_bank.h5.tmp*"))


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_missing_upstream_artifact_is_one_line(prepared):
    assert_one_line_failure(stage(prepared, "cluster"), "outputs/feature_bank.h5 not found: run the extract stage")


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_one_line_under_torchrun_too(prepared):
    set_params(prepared, **{"launcher.nproc_per_node": 2, "extract.batch_size": 2})
    trees.truncate(sorted((prepared / "data/synthetic/images/train").iterdir())[5])
    proc = stage(prepared, "extract")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image"), proc.stderr[-3000:]


# -- a full disk ----------------------------------------------------------------------------------------------
def test_full_disk_while_writing_leaves_nothing_and_says_how_much(prepared, monkeypatch, capsys):
    """The feature bank's writer fails with ENOSPC half way: no file that looks complete is left, and the one
    line names the path and the space."""
    import transfgu.feature_bank as feature_bank
    real = feature_bank.merge_batches

    def full_disk(*args, **kwargs):
        real(*args, **kwargs)  # the data is written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(feature_bank, "merge_batches", full_disk)
    monkeypatch.chdir(prepared)
    before = snapshot(prepared)
    with pytest.raises(SystemExit) as e:
        run_stage_here("extract")
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: writing outputs/feature_bank.h5 failed: No space left on device; it needs "
                           "more than the "), line
    assert "MB are free there" in line
    assert snapshot(prepared) == before
    assert not (prepared / "outputs/feature_bank.h5").exists()
    assert not list((prepared / "outputs").glob(".feature_bank.h5.tmp*"))


def test_disk_error_of_atomic_output_names_the_needed_size(tmp_path):
    from transfgu.errors import OutputWriteError
    from transfgu.io import atomic_output
    target = tmp_path / "big.bin"
    with pytest.raises(OutputWriteError, match=r"writing .*big.bin failed: No space left on device; it needs about "
                                               r"3.0 MB, [0-9.]+ MB are free there"):
        with atomic_output(target, needed_bytes=3 * 2 ** 20) as tmp:
            tmp.write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a disk error"):  # other errors pass through unchanged
        with atomic_output(target) as tmp:
            raise ValueError("not a disk error")


def test_ctrl_c_is_one_line_saying_what_was_kept(prepared, monkeypatch, capsys, caplog):
    """Ctrl-C in the second batch of extract: no traceback, status 130, one line saying that the finished batch is
    kept and a re-run continues from it; the re-run then computes the other batches only."""
    import transfgu.crops as crops
    real, calls = crops.crop_features, []

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(crops, "crop_features", interrupted_second_time)  # what stages/extract.py imports
    monkeypatch.chdir(prepared)
    with pytest.raises(SystemExit) as e:
        run_stage_here("extract")
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted: extract stopped; its finished batches are kept and a "
                                            "re-run (dvc repro) continues from them")
    assert not (prepared / "outputs/feature_bank.h5").exists()
    [pieces] = (prepared / "outputs").glob(".feature_bank.h5.pieces-*")
    assert len(list(pieces.iterdir())) >= 1
    monkeypatch.setattr(crops, "crop_features", real)
    with caplog.at_level("INFO", logger="transfgu"):
        run_stage_here("extract")
    assert (prepared / "outputs/feature_bank.h5").is_file()
    assert "resuming from" in caplog.text and "1 of 2 batches already done" in caplog.text


# -- transfgu predict ---------------------------------------------------------------------------------------
@pytest.fixture()
def predict_dir(tmp_path):
    import numpy as np
    from PIL import Image
    from tiny_project import predict_files
    predict_files(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(imgs / name)
    trees.truncate(imgs / "b.png")
    return tmp_path


def predict(root, *extra):
    from transfgu.cli import main
    return main(["predict", str(root / "imgs"), "--decoder", str(root / "decoder.pt"), "--params",
                 str(root / "params.yaml"), "--out", str(root / "out"), *extra])


def error_line(capsys) -> str:
    """The one line an expected error printed (stderr holds nothing else)."""
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


def test_predict_with_a_decoder_of_another_backbone_is_one_line(predict_dir, capsys):
    with pytest.raises(SystemExit) as e:
        predict(predict_dir, "--arch", "vit_small")
    assert e.value.code == 2
    assert error_line(capsys) == (f"error: {predict_dir / 'decoder.pt'} was trained on a backbone of width 192 (vit_mini, "
                                   f"vit_mini_dinov2, vit_mini_dinov3, vit_mini_reg4_dinov2, vit_tiny), but the backbone is vit_small of width 384: pass --arch (and "
                                   f"--checkpoint) of the backbone it was trained with, or its params.yaml")
    assert not (predict_dir / "out").exists()


def test_predict_stops_at_an_unreadable_image_or_skips_it(predict_dir, caplog, capsys):
    with pytest.raises(SystemExit) as e:
        predict(predict_dir)
    assert e.value.code == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and "cannot read image" in line and "b.png" in line
    predict(predict_dir, "--skip-bad")
    assert sorted(p.name for p in (predict_dir / "out").glob("*_label.png")) == ["a_label.png", "c_label.png"]
    assert any(r.levelname == "WARNING" and "b.png" in r.getMessage() for r in caplog.records)


def test_predict_with_a_missing_checkpoint_is_one_line(predict_dir, capsys):
    with pytest.raises(SystemExit) as e:
        predict(predict_dir, "--checkpoint", str(predict_dir / "nope.pth"))
    assert e.value.code == 2
    assert "backbone checkpoint not found" in error_line(capsys)


@pytest.mark.parametrize("size", [60, 4])
def test_predict_with_a_size_off_the_patch_grid_is_one_line(predict_dir, capsys, size):
    with pytest.raises(SystemExit) as e:
        predict(predict_dir, "--size", str(size))
    assert e.value.code == 2
    assert error_line(capsys) == f"error: --size / dataset.R: expected a multiple of the patch size 8, got {size}"
    assert not (predict_dir / "out").exists()


def test_predict_checks_params_yaml(predict_dir, capsys):
    """transfgu predict reads params.yaml through the same typed configuration as the stages."""
    text = (predict_dir / "params.yaml").read_text().replace("arch: vit_mini", "arch: vit_mni")
    (predict_dir / "params.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        predict(predict_dir)
    assert e.value.code == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {predict_dir / 'params.yaml'}: backbone.arch: expected one of ") and "vit_mni" in line
