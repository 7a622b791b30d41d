"""DVC's run cache can serve every stage but prepare (which runs on every repro), and nothing in a stage's identity
says where the dataset lives: dvc.yaml declares no plain output with `cache: false` (DVC turns its run cache off for
such a stage), no cached output is also kept in git, and no stage after prepare reads `dataset.root`."""
import subprocess
from pathlib import Path

import pytest
import yaml

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
