"""Interrupted runs: extract, pseudo, evaluate and train killed with SIGKILL (the TRANSFGU_FAULT hook of
transfgu/faults.py) at seeded random points, twice, then re-run: the artifacts are the same bytes as an
uninterrupted run, also when the re-run has another number of processes; nothing is left behind after success;
work kept by a run with other params is removed, not reused. Also: a non-finite loss stops training at once,
and the fingerprint that keys the kept work."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tiny_project import copy_project, default_params

REPO = Path(__file__).resolve().parent.parent
# 6 extract / pseudo batches, 4 epochs of 3 steps (bootstrapping from epoch 1, hand-overs at 1 and 2, dropout on),
# 5 evaluate batches; pictures from the first two evaluate batches
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 12, "n_val": 10, "size": 64}},
        "extract": {"batch_size": 2, "crop_batch": 64}, "pseudo": {"batch_size": 2},
        "train": {"epochs": 4, "batch_size": 4, "bootstrap_start": 1, "bootstrap_intervals": [2]},
        "evaluate": {"batch_size": 2, "n_pictures": 3}}
UNITS = {"extract": 6, "pseudo": 6, "train": 4, "evaluate": 5}  # batches (pieces) or epochs (checkpoints)
ARTIFACTS = {"extract": ["feature_bank.h5"], "pseudo": ["pseudo_masks.h5", "pseudo_metrics.json"],
             "train": ["decoder.pt", "train_log.csv"],
             "evaluate": ["metrics.json", "per_class_iou.csv", "confusion.csv", "confusion_plot.csv", "predictions",
                          "pictures"]}
FAULTS_TRIED = []  # (stage, processes, fault, what was kept after it): printed at the end (pytest -s)


def run(root, name, nproc=1, fault=None, args=()):
    """`python stages/<name>.py` with nproc processes; with a fault, it must die at that fault point."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launcher"]["nproc_per_node"] = nproc
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.pop("TRANSFGU_FAULT", None)
    if fault:
        env["TRANSFGU_FAULT"] = fault
    proc = subprocess.run([sys.executable, f"stages/{name}.py", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if fault:
        assert proc.returncode != 0 and f"TRANSFGU_FAULT={fault}: SIGKILL" in text, text[-3000:]
    else:
        assert proc.returncode == 0, f"{name} x{nproc} failed:\n{text[-3000:]}"
    return text


def set_param(root, section, key, value):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def hidden(folder: Path) -> list:
    """Work kept by interrupted runs (pieces, checkpoints, temporary files): the hidden entries of a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def pieces_of(root, stage, out="outputs"):
    """The complete pieces and the temporary files in the stage's piece folder."""
    final = {"extract": "feature_bank.h5", "pseudo": "pseudo_masks.h5", "evaluate": "predictions"}[stage]
    (folder,) = (root / out).glob(f".{final}.pieces-*")
    names = [p.name for p in folder.iterdir()]
    return sorted(n for n in names if n.startswith("batch")), sorted(n for n in names if ".tmp-" in n)


def checkpoint_epoch(root):
    (path,) = (root / "outputs").glob(".decoder.pt.checkpoint-*")
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def reset(root, stage):
    """Every artifact of the uninterrupted run in place, but the stage's own; nothing hidden left over."""
    out = root / "outputs"
    shutil.rmtree(out)
    shutil.copytree(root / "ref", out)
    for name in ARTIFACTS[stage]:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def read_log(path):
    """train_log.csv without the wall-time column (`seconds` differs between any two runs)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_artifacts(root, stage, ref="ref", out="outputs", names=None):
    for name in names or ARTIFACTS[stage]:
        a, b = root / out / name, root / ref / name
        if name == "train_log.csv":
            assert read_log(a) == read_log(b)
        elif b.is_dir():
            files = sorted(p.name for p in b.iterdir())
            assert sorted(p.name for p in a.iterdir()) == files and files, name
            for f in files:
                assert (a / f).read_bytes() == (b / f).read_bytes(), f"{name}/{f}"
        else:
            assert a.read_bytes() == b.read_bytes(), name


def seeded(stage, salt=""):
    return np.random.default_rng(zlib.crc32(f"{stage}{salt}".encode()))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny synthetic project, every stage run once without interruption: outputs copied to ref/."""
    root = tmp_path_factory.mktemp("resume")
    copy_project(root, default_params(TINY), code=("stages",))
    for name in ("prepare", "extract", "cluster", "pseudo", "train", "evaluate"):
        run(root, name)
    assert hidden(root / "outputs") == []
    shutil.copytree(root / "outputs", root / "ref")
    yield root
    if FAULTS_TRIED:
        print("\nfaults tried (stage, processes, TRANSFGU_FAULT, kept afterwards):")
        for row in FAULTS_TRIED:
            print("  ", *row)


def kept(root, stage):
    if stage == "train":
        return f"checkpoint of epoch {checkpoint_epoch(root)}"
    done, tmp = pieces_of(root, stage)
    return f"{len(done)} pieces" + (f" + {len(tmp)} temporary" if tmp else "")


# a run with another value of a param the stage reads, killed: its work must be removed, not reused (one
# sharded stage and train: the same code for the others)
OTHER_PARAMS = {"pseudo": ("pseudo", "mass", 0.5), "train": ("train", "lr", 1.0e-3)}


def killed_with_other_params(root, stage):
    """Run the stage with one param changed, killed after 2 units; return the name of the work it left."""
    section, key, value = OTHER_PARAMS[stage]
    before = yaml.safe_load((root / "params.yaml").read_text())[section][key]
    set_param(root, section, key, value)
    try:
        run(root, stage, fault=f"{stage}:2")
    finally:
        set_param(root, section, key, before)
    (stale,) = hidden(root / "outputs")
    FAULTS_TRIED.append((stage, 1, f"{stage}:2 with {section}.{key}={value}", kept(root, stage)))
    return stale


@pytest.mark.parametrize("stage", ["extract", "pseudo", "evaluate"])
@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_sharded_stage_killed_resumed_with_other_process_counts_gives_the_same_bytes(project, stage):
    """0. (pseudo) a run with other params killed (its pieces must not be reused); 1. one process killed after a
    seeded random number n1 of batches (the stale pieces removed, n1 kept); 2. two processes resume, killed while rank 1
    writes its first piece (temporary file written, not renamed); 3. two processes finish and are killed once the
    artifacts are complete, before the pieces are removed: the artifacts are already the uninterrupted run's
    bytes; 4. one process re-runs from the complete pieces: the same bytes, nothing left."""
    root, units = project, UNITS[stage]
    reset(root, stage)
    stale = killed_with_other_params(root, stage) if stage in OTHER_PARAMS else None
    n1 = int(seeded(stage).integers(1, units - 2))  # 1 .. units - 3: rank 1 of 2 has a batch left in step 2
    out = run(root, stage, fault=f"{stage}:{n1}")
    if stale:
        assert f"removing outputs/{stale}" in out and stale not in hidden(root / "outputs")
    assert not any((root / "outputs" / a).exists() for a in ARTIFACTS[stage])
    assert pieces_of(root, stage) == ([f"batch{b:06d}.h5" for b in range(n1)], [])
    FAULTS_TRIED.append((stage, 1, f"{stage}:{n1}", kept(root, stage)))
    out = run(root, stage, nproc=2, fault=f"{stage}:1:partial@1")
    assert f"{n1} of {units} batches already done" in out
    done, tmp = pieces_of(root, stage)
    assert len(done) >= n1 and len(tmp) >= 1
    FAULTS_TRIED.append((stage, 2, f"{stage}:1:partial@1", kept(root, stage)))
    run(root, stage, nproc=2, fault=f"{stage}:end")
    assert_same_artifacts(root, stage)
    assert pieces_of(root, stage) == ([f"batch{b:06d}.h5" for b in range(units)], [])
    FAULTS_TRIED.append((stage, 2, f"{stage}:end", kept(root, stage) + ", artifacts complete"))
    out = run(root, stage)
    assert f"{units} of {units} batches already done" in out
    assert_same_artifacts(root, stage)
    assert hidden(root / "outputs") == []


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_train_killed_three_times_gives_the_same_bytes(project):
    """0. a run with another lr killed (its checkpoint must not be reused); 1. killed after a seeded random
    number n1 of epochs; 2. killed while writing the next checkpoint; 3. killed once decoder.pt and train_log.csv
    are written, before the checkpoint is removed; 4. run to the end: the uninterrupted run's decoder.pt bytes
    and train_log.csv (but the wall-time column), no checkpoint left."""
    root, units = project, UNITS["train"]
    reset(root, "train")
    stale = killed_with_other_params(root, "train")
    n1 = int(seeded("train").integers(1, units))
    out = run(root, "train", fault=f"train:{n1}")
    assert f"removing outputs/{stale}" in out and stale not in hidden(root / "outputs")
    assert not any((root / "outputs" / a).exists() for a in ARTIFACTS["train"])
    assert checkpoint_epoch(root) == n1 - 1
    FAULTS_TRIED.append(("train", 1, f"train:{n1}", kept(root, "train")))
    out = run(root, "train", fault="train:1:partial")
    assert f"epochs 0-{n1 - 1} done" in out
    assert checkpoint_epoch(root) == n1 - 1 and len(list((root / "outputs").glob("..decoder.pt.checkpoint-*.tmp-*")))
    FAULTS_TRIED.append(("train", 1, "train:1:partial", kept(root, "train") + " + temporary"))
    run(root, "train", fault="train:end")
    assert_same_artifacts(root, "train")
    assert checkpoint_epoch(root) == units - 1
    FAULTS_TRIED.append(("train", 1, "train:end", kept(root, "train") + ", artifacts complete"))
    out = run(root, "train")
    assert f"epochs 0-{units - 1} done, 0 to go" in out
    assert_same_artifacts(root, "train")
    assert hidden(root / "outputs") == []


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_training_under_ddp_resumes_to_the_same_bytes(project):
    """Two gloo processes: rank 0 writes the checkpoint, both read it; killed after a seeded random epoch, the
    run ends with the bytes of an uninterrupted two-process run."""
    root = project
    reset(root, "train")
    run(root, "train", nproc=2)
    shutil.rmtree(root / "ref2", ignore_errors=True)
    (root / "ref2").mkdir()
    for name in ARTIFACTS["train"]:
        shutil.move(root / "outputs" / name, root / "ref2" / name)
    n1 = int(seeded("train", "ddp").integers(1, UNITS["train"]))
    run(root, "train", nproc=2, fault=f"train:{n1}")
    assert checkpoint_epoch(root) == n1 - 1
    FAULTS_TRIED.append(("train", 2, f"train:{n1}", kept(root, "train")))
    run(root, "train", nproc=2)
    assert_same_artifacts(root, "train", ref="ref2")
    assert hidden(root / "outputs") == []


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_evaluate_with_a_given_decoder_resumes(project):
    """`stages/evaluate.py --decoder` (outputs/published/<name>/) keeps its pieces there and resumes: the same
    scores and predictions as the stage's own run on the same decoder."""
    root = project
    reset(root, "evaluate")
    shutil.copy(root / "ref" / "decoder.pt", root / "copy_decoder.pt")
    published = root / "outputs" / "published" / "copy_decoder"
    run(root, "evaluate", fault="evaluate:2", args=("--decoder", "copy_decoder.pt"))
    assert len(pieces_of(root, "evaluate", "outputs/published/copy_decoder")[0]) == 2
    FAULTS_TRIED.append(("evaluate --decoder", 1, "evaluate:2", "2 pieces"))
    run(root, "evaluate", args=("--decoder", "copy_decoder.pt"))
    ref = json.loads((root / "ref" / "metrics.json").read_text())
    got = json.loads((published / "metrics.json").read_text())
    assert got == {k: v for k, v in ref.items() if not k.startswith("pseudo_")}
    assert_same_artifacts(root, "evaluate", out="outputs/published/copy_decoder",
                          names=("predictions", "pictures", "confusion.csv", "per_class_iou.csv"))
    assert hidden(published) == [] and hidden(root / "outputs") == []


@pytest.mark.slow  # spawns processes (see the module's run helpers)
def test_train_stops_on_a_non_finite_loss_with_a_one_line_error(project):
    """lr = 1e30 overflows the weights at the first step: the second step's loss is NaN; exit status 2, one line."""
    root = project
    reset(root, "train")
    before = yaml.safe_load((root / "params.yaml").read_text())["train"]["lr"]
    set_param(root, "train", "lr", 1.0e30)
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TRANSFGU_FAULT", None)
        proc = subprocess.run([sys.executable, "stages/train.py"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        set_param(root, "train", "lr", before)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at epoch 0, step 1: loss nan"), proc.stderr[-2000:]
    assert not (root / "outputs" / "decoder.pt").exists()


# -- in-process ---------------------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_training_at_once_keeping_the_last_checkpoint(tmp_path, one_thread):
    """A weight turned NaN after epoch 0 (by the on_epoch callback, after the checkpoint) gives a NaN loss at the
    first step of epoch 1: NonFiniteLoss, one line naming epoch 1 and step 0; the checkpoint still holds epoch 0."""
    from transfgu.models.decoder import build_decoder
    from transfgu.models.vit import build_backbone
    from transfgu.train import NonFiniteLoss, TrainConfig, train_decoder

    backbone = build_backbone("vit_mini", 8, None, seed=0)
    decoder = build_decoder(3, backbone.embed_dim, 0, 0.0)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g),
                "maps": torch.rand(2, 3, 4, 4, generator=g), "index": torch.tensor([2 * i, 2 * i + 1])}
               for i in range(2)]
    rows = []

    def on_epoch(row):
        rows.append(row)
        with torch.no_grad():
            decoder.proj_dec.weight.fill_(float("nan"))

    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteLoss) as e:
        train_decoder(backbone, decoder, batches, None, TrainConfig(epochs=3, batch_size=2, bootstrap_start=5),
                      False, 3, "cpu", on_epoch=on_epoch, checkpoint=checkpoint)
    message = str(e.value)
    assert "\n" not in message and "non-finite loss at epoch 1, step 0" in message and "keeps epoch 0" in message
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 0 and torch.isfinite(state["student"]["proj_dec.weight"]).all()
    assert [r["epoch"] for r in rows] == [0] and np.isfinite(rows[0]["loss"])


def test_fault_specs():
    from transfgu.faults import _parse
    assert _parse("extract:3") == ("extract", "3", False, None)
    assert _parse("train:1:partial@1") == ("train", "1", True, 1)
    assert _parse("pseudo:end") == ("pseudo", "end", False, None)
    for bad in ("extract", "extract:x", "extract:end:partial", "extract:2:later"):
        with pytest.raises(ValueError):
            _parse(bad)


def test_fingerprint_follows_config_inputs_and_code(tmp_path):
    from transfgu import io as tio
    data, code = tmp_path / "index.json", tmp_path / "mod.py"
    data.write_text("{}")
    code.write_text("x = 1")
    key = lambda cfg: tio.fingerprint(cfg, [data, None], [("mod.py", code)])  # noqa: E731
    base = key({"a": 1, "b": [1, 2]})
    assert base == key({"b": [1, 2], "a": 1}) and len(base) == 16
    assert key({"a": 2, "b": [1, 2]}) != base
    data.write_text("{ }")
    assert key({"a": 1, "b": [1, 2]}) != base
    data.write_text("{}")
    code.write_text("x = 2")
    assert key({"a": 1, "b": [1, 2]}) != base
    code.write_text("x = 1")
    assert key({"a": 1, "b": [1, 2]}) == base
    big = tmp_path / "big.bin"  # above the full-hash limit: size, mtime, first and last MiB
    big.write_bytes(b"\0" * (3 * 2 ** 20))
    d = tio.file_digest(big, full_limit=2 ** 20)
    assert d.startswith(f"{3 * 2 ** 20}:") and d == tio.file_digest(big, full_limit=2 ** 20)
    os.utime(big, ns=(1, 1))
    assert tio.file_digest(big, full_limit=2 ** 20) != d


def test_the_kept_work_is_keyed_by_the_params_dvc_yaml_lists(monkeypatch):
    """The key of a stage's kept work (Stage.run_key) changes with the params its dvc.yaml entry lists, and only
    with them: dvc.yaml is the one list."""
    from transfgu.config import validate_params
    from transfgu.stage import Stage, stage_spec

    monkeypatch.chdir(REPO)  # the code deps are paths relative to the project
    base = yaml.safe_load((REPO / "params.yaml").read_text())

    def key(**changes):
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        for dotted, value in changes.items():
            section, leaf = dotted.split("__")
            data[section][leaf] = value
        return Stage("pseudo", validate_params(data), stage_spec("pseudo")).run_key(precision="fp32")

    assert "pseudo" in stage_spec("pseudo").params and "train" not in stage_spec("pseudo").params
    assert key() == key() and base["pseudo"]["mass"] != 0.5
    assert key(pseudo__mass=0.5) != key()            # listed: a new key, the kept work is not reused
    assert key(dataset__R=32) != key()
    assert key(train__lr=0.5) == key()               # not listed: the same key
    assert key(evaluate__n_pictures=1) == key()