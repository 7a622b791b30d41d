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
    import dataset_trees as trees
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
