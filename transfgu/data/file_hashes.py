"""Content hashes of the dataset's files, cached by stat.

`prepare` fingerprints the dataset by the contents of its files, so that the same images at another path, or
copied with other modification times (a teammate's copy, a dataset moved to another disk), give the same split
index and DVC re-runs nothing after prepare. Reading every file on every `dvc repro` would take minutes on COCO,
so, as DVC does for its own outputs, a file's hash is kept with its stat (size, modification time, inode) in a
local SQLite file and re-read only when the stat changes: an unchanged repro is a stat per file.

The cache lives outside the project (`$TRANSFGU_HASH_CACHE`, default `$XDG_CACHE_HOME/transfgu/file-hashes.sqlite`,
i.e. `~/.cache/transfgu/...`): every clone, and every temporary workspace of a queued `dvc exp run`, shares it.
It is keyed by the file's absolute path; an entry whose stat no longer matches is hashed again. Deleting the
file only costs one full read of the dataset. When it cannot be opened or written (read-only home, a locked
database), hashing goes on without it, with one warning."""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "TRANSFGU_HASH_CACHE"
BLOCK = 2 ** 20


def cache_path() -> Path:
    """Where the hashes are kept: $TRANSFGU_HASH_CACHE, or $XDG_CACHE_HOME (default ~/.cache)/transfgu/."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transfgu" / "file-hashes.sqlite"


def content_hash(path: str | Path) -> str:
    """32 hex digits: BLAKE2b (16-byte digest) of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ino


class _Store:
    """The SQLite table path -> (size, mtime_ns, inode, hash); None-safe: every method does nothing (or finds
    nothing) once the database failed."""

    def __init__(self, path: Path):
        self.path, self.db = path, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                            " inode INTEGER, hash TEXT)")
        except (OSError, sqlite3.Error) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        log.warning("file-hash cache %s unusable (%s: %s): hashing every dataset file in full (set %s to a "
                    "writable file to keep the hashes)", self.path, type(e).__name__, e, CACHE_ENV)
        if self.db is not None:
            self.db.close()
        self.db = None

    def known(self, paths: list) -> dict:
        """{path: ((size, mtime_ns, inode), hash)} of those of `paths` the cache has."""
        if self.db is None:
            return {}
        found = {}
        try:
            for i in range(0, len(paths), 900):  # SQLite's limit on bound parameters
                chunk = paths[i:i + 900]
                rows = self.db.execute(f"SELECT path, size, mtime_ns, inode, hash FROM files WHERE path IN "
                                       f"({','.join('?' * len(chunk))})", chunk)
                found.update({p: ((s, m, n), h) for p, s, m, n, h in rows})
        except sqlite3.Error as e:
            self._failed(e)
        return found

    def add(self, rows: list) -> None:
        """rows: (path, (size, mtime_ns, inode), hash)."""
        if self.db is None or not rows:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                                    [(p, *key, h) for p, key, h in rows])
        except sqlite3.Error as e:
            self._failed(e)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def file_hashes(paths, num_workers: int = 0, cache: str | Path | None = None) -> list[str]:
    """The content hash (`content_hash`) of each file of `paths`, in order: from the cache (`cache_path()` unless
    given) when the file's size, modification time and inode are those recorded with it, else by reading the file
    (`num_workers` threads, at least one) and recording it."""
    from ..progress import progress
    absolute = [os.path.abspath(p) for p in paths]
    keys = [_stat_key(os.stat(p)) for p in absolute]
    store = _Store(Path(cache) if cache else cache_path())
    try:
        known = store.known(sorted(set(absolute)))
        hashes = [known[p][1] if p in known and known[p][0] == k else None for p, k in zip(absolute, keys)]
        todo = sorted({i for i, h in enumerate(hashes) if h is None}, key=lambda i: absolute[i])
        if todo:
            log.info("hashing %d of %d dataset files (new or changed since their hash was kept in %s)", len(todo),
                     len(absolute), store.path)
            with ThreadPoolExecutor(max(1, num_workers)) as pool:
                fresh = list(progress(pool.map(content_hash, [absolute[i] for i in todo]), total=len(todo),
                                      desc="hashing files", leave=False))
            for i, h in zip(todo, fresh):
                hashes[i] = h
            # kept only when the stat after reading is the one before: a file changed while it was read is hashed
            # again next time
            store.add([(absolute[i], keys[i], h) for i, h in zip(todo, fresh)
                       if _stat_key(os.stat(absolute[i])) == keys[i]])
    finally:
        store.close()
    return hashes
