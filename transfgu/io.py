"""Small I/O helpers: atomic outputs (files and folders), JSON, and the image-id column of the HDF5 artifacts."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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
                            f"Nothing was kept: free space and re-run")


@contextlib.contextmanager
def atomic_output(path: str | Path, needed_bytes: int | None = None):
    """Yield a temporary sibling path; on success it is renamed to `path`, on error removed.
    Works for files and directories, so an interrupted stage never leaves an output that looks complete.
    A write that fails for the disk's sake (full, I/O error) becomes an OutputWriteError naming the path and
    the space needed (`needed_bytes` when the caller knows it) and free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, OutputWriteError) or not is_disk_error(e):
            raise
        raise disk_error(path, e, _size(tmp), needed_bytes) from e
    finally:
        _remove(tmp)


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def write_image_ids(h5: h5py.File, ids) -> None:
    h5.create_dataset("image_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype(), track_times=False)

