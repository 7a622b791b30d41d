"""Small I/O helpers: atomic outputs (files and folders), JSON, the image-id column of the HDF5 artifacts, and
fingerprints of what a run depends on (params, input files, code)."""
from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from .errors import InputFileNotFound, OutputWriteError


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def is_disk_error(e: BaseException) -> bool:
    """A write that failed for the disk's sake (full, quota, read-only, I/O error), also as HDF5 reports it."""
    if not isinstance(e, OSError):
        return False
    if e.errno in DISK_ERRNOS:
        return True
    text = str(e)
    return any(os.strerror(n) in text or f"errno = {n}," in text for n in DISK_ERRNOS)


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def disk_error(path: str | Path, e: OSError, written: int = 0, needed: int | None = None) -> OutputWriteError:
    """One line for a failed write: the path, why, how much was written, how much is needed and free."""
    path = Path(path)
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    reason = os.strerror(e.errno) if e.errno in DISK_ERRNOS else str(e).splitlines()[0]
    need = (f"it needs about {needed / 2 ** 20:.1f} MB" if needed else
            f"it needs more than the {written / 2 ** 20:.1f} MB written before the failure")
    return OutputWriteError(f"writing {path} failed: {reason}; {need}, {free / 2 ** 20:.1f} MB are free there. "
                            f"It was not written: free space and re-run (extract, pseudo, evaluate and train "
                            f"keep their completed work and resume)")


@contextlib.contextmanager
def atomic_output(path: str | Path, needed_bytes: int | None = None, durable: bool = False):
    """Yield a temporary sibling path; on success it is renamed to `path`, on error removed.
    Works for files and directories, so an interrupted stage never leaves an output that looks complete.
    The temporary names of processes that no longer exist (killed with SIGKILL: no cleanup ran) are removed.
    A write that fails for the disk's sake (full, I/O error) becomes an OutputWriteError naming the path and
    the space needed (`needed_bytes` when the caller knows it) and free. `durable`: a file is fsynced before
    the rename (its contents reach the disk before its name does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(old)
    try:
        yield tmp
        if durable and tmp.is_file():
            fsync_file(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, OutputWriteError) or not is_disk_error(e):
            raise
        raise disk_error(path, e, _size(tmp), needed_bytes) from e
    finally:
        _remove(tmp)


def link_tree(src: str | Path, dst: str | Path) -> None:
    """Make `dst` a folder of hard links to the files of the folder `src` (no data copied; the files are copies
    where the filesystem has no hard links), so `src` stays whole until it is removed."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_dir():
            link_tree(f, dst / f.name)
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def fsync_file(path: str | Path) -> None:
    """Flush a file's contents to the disk (what survives a power loss, not only a killed process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, header, rows) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def size_mb(path: str | Path) -> float:
    """A file's or a folder's size in MiB."""
    return _size(Path(path)) / 2 ** 20


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def write_image_ids(h5: h5py.File, ids) -> None:
    h5.create_dataset("image_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype(), track_times=False)


# -- what a run depends on: the key of the work an interrupted stage resumes from (transfgu/pieces.py) ------
FULL_HASH_LIMIT = 256 * 2 ** 20


def file_digest(path: str | Path, full_limit: int = FULL_HASH_LIMIT) -> str:
    """A file's identity, cheaply: the SHA-1 of its contents up to `full_limit` bytes (an index, centroids, a
    backbone or decoder checkpoint: at most a second); above (a pseudo-mask file of many GB), its size,
    mtime and the SHA-1 of its first and last MiB. 'missing' when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    st, h = path.stat(), hashlib.sha1()
    with open(path, "rb") as f:
        if st.st_size <= full_limit:
            for block in iter(partial(f.read, 2 ** 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f.read(2 ** 20))
        f.seek(-2 ** 20, os.SEEK_END)
        h.update(f.read(2 ** 20))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def fingerprint(config: dict, inputs=(), code=()) -> str:
    """16 hex digits naming what a stage's results depend on: `config` (the params it reads and values
    resolved at run time, e.g. the precision and the device type; JSON with sorted keys), the input files
    (`file_digest`; None entries skipped) and the code ((name, path) pairs: a stage's code deps). The
    world size is not part of it: a run with another number of processes computes the same batches."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for p in inputs:
        if p is not None:
            h.update(f"\0input {Path(p).name}\0{file_digest(p)}".encode())
    for name, p in code:
        h.update(f"\0code {name}\0{file_digest(p)}".encode())
    return h.hexdigest()[:16]
