"""The README's quick start, verbatim: its first bash block, run with bash in a fresh copy of the project (the
files git knows, a new git repository, as a clone) whose params.yaml is overridden by a tiny configuration.
`make repro` finds the environment installed (.venv links to the interpreter running the tests) and runs
`dvc repro`; everything else is the README's own command lines. Then the recovery line the block gives for a
failed `dvc exp run`, after a run that fails."""
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_project import merge, tiny_dag

pytestmark = pytest.mark.slow  # the whole module spawns dvc / torchrun / bash processes

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.prefix) / "bin"

TINY = tiny_dag(n_train=8, n_val=4, size=48)


def quickstart_block() -> str:
    """The README's first ```bash block: the quick start."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert block.startswith("make repro") and "dvc exp run -S granularity=12" in block, block
    return block


def recovery_line(block: str) -> str:
    """The command the block gives (as an indented comment) for a failed `dvc exp run`, without its comment."""
    lines = block.splitlines()
    i = next(i for i, line in enumerate(lines) if "failed `dvc exp run`" in line)
    line = next(line for line in lines[i + 1:] if line.startswith("#   "))
    return shlex.join(shlex.split(line.lstrip("#"), comments=True))


def bash(script: str, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{script}\nfailed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if not (BIN / "activate").is_file():
        pytest.skip(f"the tests do not run in a virtual environment ({BIN} has no activate script)")
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFGU_", "VIRTUAL_ENV", "DVC_"))}
    env.update(PYTHONPATH=str(root), DVC_NO_ANALYTICS="1", COLUMNS="120", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    bash("git init -q && git add -A && git commit -q -m clone", root, env)
    venv = root / ".venv"  # the environment `make` would create, already installed: links to this one
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():  # bin, lib, pyvenv.cfg...: python finds its packages through them
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than pyproject.toml: `make` does not install
    return root, env


@pytest.fixture(scope="module")
def quickstart(clone):
    root, env = clone
    block = quickstart_block()
    return root, env, block, bash(block, root, env)


HEADLINE = ["miou", "pixel_accuracy", "baseline_miou", "miou_things", "miou_stuff", "crf_miou"]
CRF_REST = ["crf_pixel_accuracy", "crf_miou_things", "crf_miou_stuff"]  # in metrics.json, not in the README's columns
LINEAR = ["linear_miou"]  # outputs/probe_metrics.json, the linear probe (its pixel accuracy is not a column)


def block_command(block: str, start: str) -> str:
    """The block's command line that starts with `start`, without its comment."""
    (line,) = [line for line in block.splitlines() if line.startswith(start)]
    return shlex.join(shlex.split(line, comments=True))


def exp_entries(shown: list):
    """(kind, name, params.yaml data) of each row of `dvc exp show --json`: workspace, baseline, experiment."""
    for entry in shown:
        params = entry["data"]["params"]["params.yaml"]["data"]
        yield ("workspace" if entry["rev"] == "workspace" else "baseline"), entry["name"], params
        for exp in entry.get("experiments") or []:
            for rev in exp["revs"]:
                yield "experiment", rev["name"], rev["data"]["params"]["params.yaml"]["data"]


def test_quickstart_runs_as_printed(quickstart):
    """The block's output, with its tables read again through DVC's machine formats (--json, --csv) so that no
    assertion depends on how a DVC version draws a table; on the printed text only: nothing is cut to "…" and
    every column name shows in one piece at COLUMNS=120."""
    root, env, block, proc = quickstart
    out = proc.stdout + proc.stderr
    assert out.count("Running stage 'evaluate'") == 2  # make repro, then the granularity=12 experiment
    assert "Running stage 'extract'" in out and out.count("Running stage 'extract'") == 1
    assert (root / "dvc_plots" / "index.html").is_file()
    activate = "source .venv/bin/activate && "
    # dvc metrics show outputs/metrics.json: the headline only
    shown = json.loads(bash(activate + block_command(block, "dvc metrics show") + " --json", root, env).stdout)
    files = {path: f["data"] for rev in shown.values() for path, f in rev["data"].items()}
    assert list(files) == ["outputs/metrics.json"]
    assert set(files["outputs/metrics.json"]) == {*HEADLINE, "baseline_pixel_accuracy", *CRF_REST}
    # dvc exp show --drop/--keep: the headline and granularity columns, a value in each for the workspace, the
    # baseline commit and the granularity=12 experiment
    exp_show = block_command(block, "dvc exp show")
    table = list(csv.reader(io.StringIO(bash(activate + exp_show + " --csv", root, env).stdout)))
    assert table[0] == ["Experiment", "miou", "pixel_accuracy", "crf_miou", *LINEAR, "granularity"], table[0]
    assert len(table) == 1 + 3 and all(all(row[1:]) for row in table[1:]), table
    rows = list(exp_entries(json.loads(bash(activate + exp_show + " --json", root, env).stdout)))
    assert sorted(kind for kind, _, _ in rows) == ["baseline", "experiment", "workspace"], rows
    grains = {kind: params["granularity"] for kind, _, params in rows}
    assert grains["workspace"] == grains["experiment"] == 12, grains
    # the printed tables at COLUMNS=120: nothing elided, no column name broken over lines
    assert "…" not in proc.stdout, proc.stdout[-4000:]
    for name in [*HEADLINE, "baseline_pixel_accuracy", *LINEAR, "granularity"]:
        assert re.search(rf"(?<!\w){name}(?!\w)", proc.stdout), (name, proc.stdout[-4000:])


def test_recovery_line_after_a_failed_experiment(quickstart):
    """A failed `dvc exp run` leaves the failed stage's outputs deleted (here prepare's: the params check stops it
    first, in one line) and its -S value in params.yaml; the README's recovery line, the same run with the value
    fixed, keeps the workspace's other values (granularity 12, from the block's experiment; `git checkout
    params.yaml` would lose it) and brings everything back from DVC's run cache: nothing runs but prepare."""
    root, env, block, _ = quickstart
    failed = bash("source .venv/bin/activate && dvc exp run -S train.select_by=bogus", root, env, check=False)
    text = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "error: params.yaml: train.select_by: expected one of val, last, got 'bogus'" \
        in text and "Traceback" not in text, text[-3000:]
    assert not (root / "outputs" / "index.json").exists()
    assert "bogus" in (root / "params.yaml").read_text()
    line = recovery_line(block)
    assert line == "dvc exp run -S train.select_by=val"
    out = bash(f"source .venv/bin/activate && {line}", root, env)
    text = out.stdout + out.stderr
    assert re.findall(r"Running stage '(\w+)'", text) == ["prepare"], text[-3000:]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["select_by"] == "val" and params["granularity"] == 12
    assert (root / "outputs" / "decoder.pt").is_file() and (root / "outputs" / "dvclive" / "metrics.json").is_file()
    status = json.loads(bash("source .venv/bin/activate && dvc status --json", root, env).stdout)
    assert status == {"prepare": ["always changed"]}, status  # prepare re-reads the data on every repro
