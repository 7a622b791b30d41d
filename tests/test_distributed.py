"""torchrun with 2 gloo processes against 1 process: the same feature bank and pseudo-mask bytes, the same
confusion matrix and metrics, the same decoder after 3 training steps; a failing rank ends the run. The same
with 2 torchrun agents standing for 2 machines (--nnodes=2 on 127.0.0.1), and with `dvc repro` inside an
allocation of a real one-host Slurm cluster (launcher.backend: slurm; 2 srun tasks standing for 2 nodes)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import slurm_cluster
from tiny_project import copy_project, default_params, run

pytestmark = pytest.mark.slow  # the whole module spawns dvc / torchrun / bash processes

REPO = Path(__file__).resolve().parent.parent
TINY = {"dataset": {"R": 32, "synthetic": {"n_train": 12, "n_val": 6, "size": 64}},
        "extract": {"batch_size": 4, "crop_batch": 64}, "pseudo": {"batch_size": 4},
        "train": {"epochs": 1, "batch_size": 4, "bootstrap_start": 0, "dropout": 0.0},
        "evaluate": {"batch_size": 2, "n_pictures": 3}}


def stage(root, name, nproc=1, check=True):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launcher"]["nproc_per_node"] = nproc
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, f"stages/{name}.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{name} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    copy_project(root, default_params(TINY))
    for name in ("prepare", "extract", "cluster", "pseudo", "train", "evaluate"):
        stage(root, name)
    shutil.copytree(root / "outputs", root / "one")
    for name in ("extract", "pseudo", "train"):
        stage(root, name, nproc=2)
    shutil.copy(root / "outputs" / "decoder.pt", root / "two_decoder.pt")
    shutil.copy(root / "one" / "decoder.pt", root / "outputs" / "decoder.pt")  # evaluate the same decoder
    stage(root, "evaluate", nproc=2)
    return root


@pytest.mark.parametrize("name", ["feature_bank.h5", "pseudo_masks.h5", "pseudo_metrics.json"])
def test_sharded_stages_write_identical_files(runs, name):
    assert (runs / "outputs" / name).read_bytes() == (runs / "one" / name).read_bytes()
    assert not [p for p in (runs / "outputs").iterdir() if p.name.startswith(".")], "pieces or checkpoints left"


def test_sharded_evaluate_gives_identical_confusion_metrics_and_predictions(runs):
    assert_same_evaluation(runs / "one", runs / "outputs")


def assert_same_evaluation(one_dir, outputs):
    for name in ("metrics.json", "eval_details.json", "cluster_classes.json", "confusion.csv", "per_class_iou.csv"):
        assert (outputs / name).read_text() == (one_dir / name).read_text(), name
    one = sorted(p.name for p in (one_dir / "predictions").iterdir())
    two = sorted(p.name for p in (outputs / "predictions").iterdir())
    assert one == two and len(one) == 6
    for n in one:
        assert (one_dir / "predictions" / n).read_bytes() == (outputs / "predictions" / n).read_bytes()
    assert len(list((outputs / "pictures").iterdir())) == 3
    assert json.loads((outputs / "eval_details.json").read_text())["n_images"] == 6


def test_ddp_training_matches_one_process_after_three_steps(runs):
    """Same global batches (4 = 2 x 2), per-sample augmentation: the weights agree to rounding. Adam divides
    each gradient by its own magnitude, so an element whose gradient is ~0 can move by up to lr per step
    on rounding noise alone: all but a handful of the ~1M weights agree within 1e-5, and none differs by
    more than 3 steps x lr."""
    assert_same_training(runs / "one", runs / "two_decoder.pt", runs / "outputs" / "train_log.csv")


def assert_same_training(one_dir, decoder, train_log):
    one = torch.load(one_dir / "decoder.pt", weights_only=True)
    two = torch.load(decoder, weights_only=True)
    assert one.keys() == two.keys()
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    init = torch.cat([v.flatten() for v in one.values()])
    assert (diffs > 1e-5).sum() <= 10, f"{int((diffs > 1e-5).sum())} of {diffs.numel()} weights differ"
    assert diffs.max() <= 3 * 1e-4 + 1e-6
    assert diffs.numel() == init.numel() > 100_000
    log_one = (one_dir / "train_log.csv").read_text().splitlines()[1].split(",")
    log_two = train_log.read_text().splitlines()[1].split(",")
    np.testing.assert_allclose([float(v) for v in log_one[1:5]], [float(v) for v in log_two[1:5]], rtol=1e-5)


def test_a_failing_rank_ends_the_run_with_its_error(runs):
    """Image 4 is in batch 1, which rank 1 reads: its error (naming the file) ends both processes."""
    entries = json.loads((runs / "outputs" / "index.json").read_text())["splits"]["train"]
    bad = runs / "data" / "synthetic" / entries[4]["image"]
    saved = bad.read_bytes()
    try:
        bad.write_bytes(saved[:60])
        proc = stage(runs, "extract", nproc=2, check=False)
    finally:
        bad.write_bytes(saved)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "cannot read image" in text and entries[4]["image"].split("/")[-1] in text
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)", text, re.S), text[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_launcher(root, **launcher):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["launcher"].update(launcher)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_two_torchrun_agents_as_two_machines_give_the_one_process_feature_bank(runs, tmp_path):
    """Several machines by hand (docs/usage.md): the same stage started on each machine with launcher.nnodes=2
    and the rendezvous on the first; here the 2 agents run on one host, the rendezvous at 127.0.0.1."""
    root = Path(shutil.copytree(runs, tmp_path / "p", ignore=shutil.ignore_patterns("one", "two_decoder.pt",
                                                                                        "feature_bank.h5")))
    set_launcher(root, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    agents = [subprocess.Popen([sys.executable, "stages/extract.py"], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)[-3000:]
    assert "[extract rank 0/2]" in "".join(logs)
    assert (root / "outputs" / "feature_bank.h5").read_bytes() == (runs / "one" / "feature_bank.h5").read_bytes()


# -- a real one-host Slurm cluster -----------------------------------------------------------------------------
# The allocation has 1 node and 2 tasks; TRANSFGU_SLURM_TASKS_AS_NODES lets each task stand for a node (srun -n 2,
# node rank SLURM_PROCID, each torchrun agent 1 gloo process), the rendezvous at 127.0.0.1 (transfgu/launch.py).
AS_TWO_NODES = {"TRANSFGU_SLURM_TASKS_AS_NODES": "1", "TRANSFGU_RDZV_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd + munged of tests/slurm_cluster.py, stopped at the end whatever happened."""
    folder = tmp_path_factory.mktemp("slurm")
    if len(str(folder)) > 80:  # the munge socket's path must fit a unix socket address (108 bytes)
        folder = Path(tempfile.mkdtemp(prefix="transfgu-slurm-"))
    try:
        cluster = slurm_cluster.start(folder)
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no one-host Slurm cluster: {e}")
    yield cluster
    cluster.stop()


def in_allocation(cluster, cwd, *args, check=True) -> subprocess.CompletedProcess:
    """`salloc --quiet -n 2 ARGS` in `cwd` (no salloc lines after the command's), with this environment's python and dvc first on PATH."""
    env = {**cluster.env, **AS_TWO_NODES, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run([shutil.which("salloc", path=env["PATH"] + ":/usr/bin"), "--quiet", "-n", "2", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_srun_tasks_are_torchrun_agents_ranked_by_slurm(slurm, tmp_path):
    """Each srun task's torchrun agent takes the task's rank as its node rank (GROUP_RANK); the first node is
    the one `scontrol show hostnames` lists first."""
    from transfgu.launch import first_node
    for nodelist in ("gpu[007-009,012],cpu1", "rack[1-2]-n[01-04]", "n[0010-0012]", slurm.node):
        listed = slurm.run("scontrol", "show", "hostnames", nodelist)
        assert first_node(nodelist) == listed.stdout.split()[0], (nodelist, listed)
    (tmp_path / "probe.py").write_text(
        "import os\nfrom pathlib import Path\nv = [os.environ[k] for k in ('SLURM_PROCID', 'GROUP_RANK', 'RANK', "
        "'WORLD_SIZE')]\nPath(f'rank{v[2]}').write_text(' '.join(v))\n")
    launch = ("import subprocess, sys\nfrom transfgu.config import LauncherConfig\nfrom transfgu.launch import "
              "command\nsys.exit(subprocess.call(command(LauncherConfig(backend='slurm'), 'probe.py')))")
    in_allocation(slurm, tmp_path, sys.executable, "-c", launch)
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["0 0 0 2", "1 1 1 2"]


@pytest.fixture(scope="module")
def slurm_repro(slurm, tmp_path_factory):
    """The tiny project in a git + DVC repository, `dvc repro` inside `salloc -n 2`, launcher.backend: slurm."""
    root = copy_project(tmp_path_factory.mktemp("slurm_repro"), default_params({**TINY, "launcher": {
        "backend": "slurm"}}))
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "code"], root)
    proc = in_allocation(slurm, root, sys.executable, "-m", "dvc", "repro")
    return root, proc.stdout + proc.stderr


def test_dvc_repro_under_slurm_gives_the_one_process_results(runs, slurm_repro):
    """extract, pseudo, train and evaluate ran as 2 ranks under srun (prepare and cluster as one process): the
    feature bank and pseudo masks are the one-process bytes, the decoder the one-process one up to rounding."""
    root, log = slurm_repro
    for name in ("extract", "pseudo", "train", "evaluate"):
        assert f"[{name} rank 0/2]" in log, log[-3000:]
    assert "[prepare]" in log and "[cluster]" in log
    for name in ("feature_bank.h5", "pseudo_masks.h5", "pseudo_metrics.json", "centroids.npz"):
        assert (root / "outputs" / name).read_bytes() == (runs / "one" / name).read_bytes(), name
    assert_same_training(runs / "one", root / "outputs" / "decoder.pt", root / "outputs" / "train_log.csv")


def test_evaluate_under_slurm_gives_the_one_process_metrics(runs, slurm, slurm_repro):
    """The one-process decoder evaluated by 2 ranks under srun: the same confusion matrix, metrics and
    predictions."""
    root, _ = slurm_repro
    shutil.copy(runs / "one" / "decoder.pt", root / "outputs" / "decoder.pt")
    in_allocation(slurm, root, sys.executable, "stages/evaluate.py")
    assert_same_evaluation(runs / "one", root / "outputs")


def test_a_failing_rank_under_slurm_ends_the_stage_with_its_error(slurm, slurm_repro):
    """Image 4 is in batch 1, which rank 1 (the second srun task) reads: srun --kill-on-bad-exit ends the step,
    and the stage ends with the rank's one-line error, last."""
    root, _ = slurm_repro
    entries = json.loads((root / "outputs" / "index.json").read_text())["splits"]["train"]
    bad = root / "data" / "synthetic" / entries[4]["image"]
    saved = bad.read_bytes()
    try:
        bad.write_bytes(saved[:60])
        proc = in_allocation(slurm, root, sys.executable, "stages/extract.py", check=False)
    finally:
        bad.write_bytes(saved)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image") and entries[4]["image"].split("/")[-1] in last, \
        proc.stderr[-3000:]
    assert not list(root.glob(".transfgu-*")), "the error file's folder was left"


def test_the_example_batch_script_runs_dvc_in_the_allocation(slurm, tmp_path):
    """slurm/transfgu.sbatch under sbatch, its #SBATCH lines overridden to fit the one-host cluster (no GPUs):
    it runs `dvc ARGS` in the job (here `dvc version`)."""
    shutil.copy(REPO / "slurm" / "transfgu.sbatch", tmp_path)
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                           "--gpus-per-node=0", "--output=job.out", "transfgu.sbatch", "version"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").is_file() else ""
    assert proc.returncode == 0, proc.stderr + out
    assert re.match(r"job \d+: 1 node\(s\) \(\S+\); dvc version\n", out), out
    assert "DVC version: " in out
