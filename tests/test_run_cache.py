"""DVC's run cache can serve every stage but prepare (which runs on every repro), and nothing in a stage's identity
says where the dataset lives: dvc.yaml declares no plain output with `cache: false` (DVC turns its run cache off for
such a stage), no cached output is also kept in git, and no stage after prepare reads `dataset.root`."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import dataset_trees as trees
from tiny_project import copy_project, default_params, tiny_dag
from tiny_project import run as run_in_project

REPO = Path(__file__).resolve().parent.parent
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def entries(stage: dict, kind: str):
    """(path, options) of a stage's outs, metrics or plots."""
    for e in stage.get(kind) or ():
        yield (next(iter(e.items())) if isinstance(e, dict) else (e, {}))


def cached_outs() -> list:
    return [path for stage in STAGES.values() for path, opts in entries(stage, "outs") if opts.get("cache", True)]


def test_no_stage_has_a_plain_out_without_cache():
    """What `dvc.stage.Stage.run` checks before saving a run to the run cache: an out that is neither a metric
    nor a plot and has `cache: false` disables it for the whole stage."""
    plain = [(name, path) for name, stage in STAGES.items() for path, opts in entries(stage, "outs")
             if opts.get("cache") is False]
    assert plain == []
    assert not [name for name, stage in STAGES.items() if any(o.get("persist") for _, o in entries(stage, "outs"))]
    assert [name for name, stage in STAGES.items() if stage.get("always_changed")] == ["prepare"]


def test_every_stage_but_prepare_has_an_out_the_run_cache_restores():
    assert all(list(entries(stage, "outs")) for name, stage in STAGES.items())


def test_no_cached_out_is_tracked_by_git():
    """A cached out is DVC's (dvc.lock and the cache), git-ignored; a copy in git would make `dvc checkout` and
    `git checkout` fight over it."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--", *cached_outs()], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked == []


def test_where_the_dataset_lives_is_no_part_of_any_stage_after_prepare():
    """dataset.root (alone or through the whole `dataset` section) would make a teammate's copy of the dataset at
    another path re-run everything; the stages after prepare find the files through params at run time and
    depend on their contents through outputs/index.json."""
    for name, stage in STAGES.items():
        if name == "prepare":
            continue
        assert "dataset" not in stage["params"] and "dataset.root" not in stage["params"], name


# -- the split index is the dataset's contents, wherever it lives ---------------------------------------------------
def copy_with_other_times(src: Path, dst: Path) -> Path:
    """A copy of a tree (shutil.copytree, new inodes) whose files all get another modification time."""
    import os
    import shutil
    shutil.copytree(src, dst)
    for i, f in enumerate(sorted(p for p in dst.rglob("*") if p.is_file())):
        os.utime(f, ns=(1_000_000_000 * (1000 + i), 1_000_000_000 * (1000 + i)))
    return dst


def test_a_copy_at_another_root_with_other_times_gives_the_same_index(tmp_path):
    from transfgu.data.index import prepare_index
    from transfgu.io import write_json

    first = trees.make_folder(tmp_path / "one" / "folder")
    other = copy_with_other_times(first, tmp_path / "elsewhere" / "copy")
    a = prepare_index(trees.dataset_cfg("folder", first), 0)
    b = prepare_index(trees.dataset_cfg("folder", other), 0)
    write_json(tmp_path / "a.json", a)
    write_json(tmp_path / "b.json", b)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert str(tmp_path) not in (tmp_path / "a.json").read_text()  # no path outside the dataset
    listed = [first / e[k] for split in a["splits"].values() for e in split for k in ("image", "label")]
    assert a["fingerprint"]["files"] == len(listed) == 2 * len(a["splits"]["train"] + a["splits"]["val"])
    assert a["fingerprint"]["bytes"] == sum(p.stat().st_size for p in listed)

    # other bytes under the same name and size change it
    image = sorted((other / "images" / "train").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[-1] ^= 1
    image.write_bytes(bytes(data))
    c = prepare_index(trees.dataset_cfg("folder", other), 0)
    assert c["splits"] == a["splits"] and c["fingerprint"]["bytes"] == a["fingerprint"]["bytes"]
    assert c["fingerprint"]["sha256"] != a["fingerprint"]["sha256"]


def test_file_hashes_are_the_contents_and_read_each_file_once_per_stat(tmp_path, monkeypatch):
    """A hash is blake2b-128 of the bytes (hashlib directly as the reference); a second call with nothing changed
    reads no file, a touched or rewritten file is read again, and a cache that cannot be opened only costs
    reading."""
    import hashlib
    import os

    from transfgu.data import file_hashes as fh

    files = []
    for i in range(5):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(os.urandom(1000 + i) * (i + 1))
    expected = [hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest() for f in files]
    cache = tmp_path / "cache" / "hashes.sqlite"
    read = []
    real = fh.content_hash
    monkeypatch.setattr(fh, "content_hash", lambda p: read.append(Path(p).name) or real(p))

    assert fh.file_hashes(files, num_workers=2, cache=cache) == expected
    assert sorted(read) == [f.name for f in files]
    read.clear()
    assert fh.file_hashes(files, cache=cache) == expected and read == []

    os.utime(files[1], ns=(5, 5))  # same bytes, another time: read again, same hash
    files[3].write_bytes(b"other")
    expected[3] = hashlib.blake2b(b"other", digest_size=16).hexdigest()
    assert fh.file_hashes(files, cache=cache) == expected
    assert sorted(read) == ["f1.bin", "f3.bin"]

    monkeypatch.setenv(fh.CACHE_ENV, str(tmp_path / "cache"))  # a folder, not a database file
    read.clear()
    assert fh.file_hashes(files) == expected and len(read) == 5


# -- two experiments at once never share a file -------------------------------------------------------------------
def test_kept_work_lives_in_each_workspace(tmp_path, monkeypatch):
    """Pieces of interrupted work are named relative to the stage's outs (dvc.yaml: outputs/...), so the temporary
    workspaces of two queued experiments (.dvc/tmp/exps/...) keep theirs apart: a run in one never removes the
    other's, even with another key."""
    from transfgu.pieces import keyed_path, piece_dir

    final = Path("outputs/feature_bank.h5")
    made = {}
    for name, key in (("exp_a", "0123456789abcdef"), ("exp_b", "fedcba9876543210")):
        (tmp_path / name / "outputs").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / name)
        made[name] = piece_dir(final, key).resolve()
        (made[name] / "batch000000.h5").write_bytes(b"piece")
        assert keyed_path(final, "checkpoint", key).resolve().parent == (tmp_path / name / "outputs")
    assert made["exp_a"].parent == tmp_path / "exp_a" / "outputs" and made["exp_b"].parent == tmp_path / "exp_b" / "outputs"
    assert all((d / "batch000000.h5").is_file() for d in made.values())


def test_one_process_needs_no_torchrun_and_one_node_takes_a_free_port():
    """launcher.rdzv_endpoint (a fixed port) is only used across nodes: one process runs without torchrun, several
    on one node with `--standalone` (torchrun picks a free port), so two experiments on one machine never meet."""
    from transfgu.config import validate_params
    from transfgu.stage import torchrun_command

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data["launcher"]["nproc_per_node"] * data["launcher"]["nnodes"] == 1
    assert torchrun_command("stages/extract.py", validate_params(data)) is None
    data["launcher"]["nproc_per_node"] = 2
    cmd = torchrun_command("stages/extract.py", validate_params(data))
    assert "--standalone" in cmd and not any(c.startswith("--rdzv_endpoint") for c in cmd)


def test_a_relative_root_missing_in_a_queued_workspace_says_to_give_an_absolute_path(tmp_path, monkeypatch):
    from transfgu.config import validate_params
    from transfgu.errors import InputFileNotFound

    origin = tmp_path / "project"
    (origin / "data" / "mine" / "images").mkdir(parents=True)
    workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpabc"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(origin))
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("folder", "cocostuff"):
        data["dataset"].update(name=name, root="data/mine", n_things=2)
        with pytest.raises(InputFileNotFound, match=r"dataset.root: data/mine is not a folder.*queued experiment.*"
                                                    r"give an absolute path, e\.g\. " + str(origin / "data/mine")):
            validate_params(data)
    monkeypatch.setenv("DVC_ROOT", str(workspace))  # a plain `dvc repro`: DVC_ROOT is the project itself
    with pytest.raises(InputFileNotFound) as e:
        data["dataset"].update(name="folder")
        validate_params(data)
    assert "queued" not in str(e.value)


# -- through DVC: the run cache, a shared remote, a queue ------------------------------------------------------------
TINY = tiny_dag(n_train=12, n_val=6, size=64)
AFTER_PREPARE = ["extract", "cluster", "pseudo", "train", "evaluate", "probe"]
KEPT = ["metrics.json", "cluster_classes.json", "decoder.pt", "pseudo_metrics.json", "train_log.csv",
        "dvclive/metrics.json", "eval_details.json", "confusion.csv"]


def dvc(root, *args, check=True, **env) -> str:
    proc = run_in_project([sys.executable, "-m", "dvc", *args], root, check, OMP_NUM_THREADS="1", **env)
    return proc.stdout + proc.stderr


def what_ran(output: str) -> dict:
    """{stage: 'ran' | 'run cache' | 'unchanged'} from the log of `dvc repro` / `dvc exp run`."""
    found = {name: "ran" for name in re.findall(r"Running stage '(\w+)'", output)}
    found.update({name: "run cache" for name in re.findall(r"Stage '(\w+)' is cached - skipping run", output)})
    found.update({name: "unchanged" for name in re.findall(r"Stage '(\w+)' didn't change, skipping", output)})
    return found


def outputs(root: Path) -> dict:
    return {name: (root / "outputs" / name).read_bytes() for name in KEPT}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny synthetic project as a clone has it (git and DVC, committed after its first `dvc repro`), with a local
    folder as its DVC remote (committed: the team's shared cache); then `dvc exp run -S granularity=12` and
    `dvc exp run -S granularity=6`, as the README's quick start goes on."""
    base = tmp_path_factory.mktemp("runcache")
    root = copy_project(base / "project", default_params(TINY))
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run_in_project(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "shared", str(base / "remote"))
    run_in_project(["git", "add", "-A"], root)
    run_in_project(["git", "commit", "-q", "-m", "code"], root)
    logs = {"repro": dvc(root, "repro")}
    first = outputs(root)
    run_in_project(["git", "add", "-A"], root)
    run_in_project(["git", "commit", "-q", "-m", "tiny run"], root)
    logs["12"] = dvc(root, "exp", "run", "-S", "granularity=12")
    logs["6"] = dvc(root, "exp", "run", "-S", "granularity=6")
    return root, logs, first


@pytest.mark.slow  # spawns dvc
def test_an_experiment_seen_before_runs_nothing_but_prepare(project):
    root, logs, first = project
    assert what_ran(logs["repro"]) == dict.fromkeys(["prepare", *AFTER_PREPARE], "ran")
    assert what_ran(logs["12"]) == {"prepare": "ran", "extract": "unchanged", "cluster": "ran", "pseudo": "ran",
                                    "train": "ran", "evaluate": "ran", "probe": "ran"}
    assert what_ran(logs["6"]) == {"prepare": "ran", "extract": "unchanged", "cluster": "run cache",
                                   "pseudo": "run cache", "train": "run cache", "evaluate": "run cache",
                                   "probe": "run cache"}
    assert outputs(root) == first  # restored, not recomputed: train_log.csv's seconds too
    status = json.loads(dvc(root, "status", "--json"))
    assert status == {"prepare": ["always changed"]}, status
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    grains = sorted(rev["data"]["params"]["params.yaml"]["data"]["granularity"]
                    for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"])
    assert grains == [6, 12]
    metrics = [rev["data"]["metrics"] for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    assert all(m["outputs/metrics.json"]["data"]["miou"] >= 0 and m["outputs/dvclive/metrics.json"]["data"]["epoch"] == 1
               for m in metrics)  # the metric inside the cached dvclive folder, read from each experiment


@pytest.mark.slow  # spawns dvc and git
def test_a_teammate_with_the_dataset_elsewhere_pulls_and_runs_nothing_but_prepare(project, tmp_path):
    """`dvc push --run-cache` to the shared remote; a fresh clone whose dataset is a copy at another path with other
    modification times (dataset.root set in its params.yaml) pulls, and `dvc repro` runs prepare only, to the same
    index bytes."""
    root, _, _ = project
    dvc(root, "push", "--run-cache")
    clone = tmp_path / "teammate"
    run_in_project(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    data = copy_with_other_times(root / "data" / "synthetic", tmp_path / "elsewhere" / "synthetic")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["dataset"]["root"] = str(data)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"TRANSFGU_HASH_CACHE": str(tmp_path / "teammate-hashes.sqlite")}  # the teammate's own
    dvc(clone, "pull", "--run-cache", **env)
    assert what_ran(dvc(clone, "repro", **env)) == {"prepare": "ran", **dict.fromkeys(AFTER_PREPARE, "unchanged")}
    committed = run_in_project(["git", "show", "HEAD:dvc.lock"], root).stdout
    index_md5 = yaml.safe_load(committed)["stages"]["prepare"]["outs"][0]["md5"]
    import hashlib
    assert hashlib.md5((clone / "outputs" / "index.json").read_bytes()).hexdigest() == index_md5
    assert not (data / "meta.json").stat().st_mtime_ns == (root / "data/synthetic/meta.json").stat().st_mtime_ns


QUEUE_TINY = {
    "granularity": 4,
    "dataset": {"name": "folder", "R": 32},
    "extract": {"batch_size": 4, "crop_batch": 64}, "cluster": {"niter": 10}, "pseudo": {"batch_size": 4},
    "train": {"epochs": 1, "batch_size": 2, "bootstrap_start": 1, "bootstrap_intervals": [1]},
    "evaluate": {"batch_size": 4, "n_pictures": 1, "patch_kmeans_baseline": False},
}


def queue_wait(root, timeout=600) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        status = dvc(root, "queue", "status")
        if not re.search(r"\b(Running|Queued)\b", status):
            return status
        time.sleep(3)
    dvc(root, "queue", "kill", "--all", check=False)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


@pytest.mark.slow  # spawns dvc, its queue workers and the stages
def test_a_queued_sweep_on_a_folder_dataset_at_an_absolute_path(tmp_path):
    """`dvc exp run --queue -S train.lr=...,...` then `dvc queue start -j 2`: the two experiments run at once in
    their temporary workspaces and both finish, `dvc exp show` lists both; a third, with a relative dataset.root
    that only the project's own folder has, fails in prepare with the one line that says to give an absolute
    path."""
    folder = trees.make_folder(tmp_path / "my_images")
    root = copy_project(tmp_path / "project", default_params(
        {**QUEUE_TINY, "dataset": {**QUEUE_TINY["dataset"], "root": str(folder)}}))
    shutil.copytree(folder, root / "data" / "my_images")
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run_in_project(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    run_in_project(["git", "add", "-A"], root)
    run_in_project(["git", "commit", "-q", "-m", "code"], root)
    dvc(root, "exp", "run", "--queue", "-S", "train.lr=1e-4,3e-4")
    dvc(root, "exp", "run", "--queue", "-S", "dataset.root=data/my_images", "-n", "relative-root")
    try:
        dvc(root, "queue", "start", "-j", "2")
        status = queue_wait(root)
    finally:
        dvc(root, "queue", "stop", check=False)
    rows = [line.split() for line in status.splitlines() if re.match(r"[0-9a-f]{7} ", line)]
    assert sorted(row[-1] for row in rows) == ["Failed", "Success", "Success"], status
    failed = next(row[1] for row in rows if row[-1] == "Failed")
    assert failed == "relative-root"
    log = dvc(root, "queue", "logs", failed, check=False)
    assert "dataset.root: data/my_images is not a folder" in log and "give an absolute path" in log, log[-2000:]
    for name in (row[1] for row in rows if row[-1] == "Success"):
        assert set(what_ran(dvc(root, "queue", "logs", name))) == {"prepare", *AFTER_PREPARE}
    shown = json.loads(dvc(root, "exp", "show", "--json"))
    rates = sorted(rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
                   for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]
                   if rev["name"] != failed)
    assert rates == [1e-4, 3e-4], rates
