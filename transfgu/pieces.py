"""The piece protocol of the sharded stages (extract, pseudo, evaluate): work split over processes, kept in
durable pieces, resumed after an interruption.

Batch b of a split (items [b*B, (b+1)*B)) is computed by one process (torchrun rank) and stored as its own
piece file `batch<b>.h5` (`write_piece`: a temporary name, fsync, rename, so a killed write never leaves a
file that looks complete) in a folder all ranks share, next to the artifact it builds:

    outputs/.<artifact name>.pieces-<key>/batch000000.h5, batch000001.h5, ...

`key` is a `transfgu.io.fingerprint` of everything the stage's results depend on (the params it reads, the contents of
its input files and of the code it runs), so a piece is only ever reused by a run that would compute the
same bytes; a folder with another key (a run with other params or inputs that was killed) is removed, not
reused. A run first lists the complete pieces, then deals the missing batches out to its ranks (every
world-th one, `BatchPieces`); rank 0 then concatenates all pieces in batch order (`merge_batches`) and
removes the folder. A batch is computed the same way whatever process computes it, so the artifact is the
same bytes whatever the number of processes, in one run or over several interrupted ones.

Big per-image arrays can be compressed by threads while the device computes the next batches
(`PieceWriter(packed=...)`), and are then copied chunk by chunk without a second compression pass.

`on_point` (BatchPieces, PieceWriter, write_piece) is called at the points where an interruption matters: a
piece written to its temporary name, a piece in place, the artifact complete before the pieces are removed;
the stages pass `transfgu.faults.hook`, through which the resume tests kill a process there."""
from __future__ import annotations

import logging
import os
import re
import shutil
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from . import dist
from .data.loaders import batch_loader
from .io import fsync_file
from .progress import progress

log = logging.getLogger(__name__)

# Lossless packing of the big per-image arrays (pseudo-mask gradient terms): HDF5's byte shuffle, then
# deflate level 1, one row (image) per chunk.
COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)
PIECE = re.compile(r"batch(\d+)\.h5")


def shuffle_deflate(row: np.ndarray) -> bytes:
    """One chunk's bytes as HDF5's shuffle + deflate(1) filters store them: byte k of every element, for
    k = 0 .. itemsize - 1, then a zlib stream. zlib releases the GIL, so threads compress in parallel."""
    row = np.ascontiguousarray(row)
    planes = row.reshape(-1).view(np.uint8).reshape(-1, row.dtype.itemsize).T
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), 1)


def _is_row_packed(ds: h5py.Dataset) -> bool:
    return ds.chunks == (1, *ds.shape[1:]) and ds.compression == "gzip" and ds.compression_opts == 1 and ds.shuffle


# -- where a run keeps its work --------------------------------------------------------------------------
def keyed_path(final: Path, kind: str, key: str) -> Path:
    """`.<final name>.<kind>-<key>` next to `final` (outside DVC's outs: a hidden sibling), where a stage
    keeps its work in progress. Rank 0 removes the siblings of the same kind with another key (a killed run
    with other params, inputs or code), the shard folders of older versions (`.<name>.shards-<pid>`) and the
    temporary files of killed writes of any key (no process writes them before this call returns)."""
    path = final.parent / f".{final.name}.{kind}-{key}"
    if dist.is_main():
        for old in [*final.parent.glob(f".{final.name}.{kind}-*"), *final.parent.glob(f".{final.name}.shards-*")]:
            if old != path:
                log.info("removing %s, left by an interrupted run with other params, inputs or code", old)
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        for tmp in final.parent.glob(f"..{final.name}.{kind}-*.tmp-*"):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    return path


def piece_dir(final: Path, key: str) -> Path:
    """The folder shared by all ranks for the pieces of `final` (`keyed_path(final, 'pieces', key)`),
    created by rank 0, with the temporary files of killed writes removed."""
    path = keyed_path(final, "pieces", key)
    if dist.is_main():
        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob(".*.tmp-*"):
            tmp.unlink()
    dist.barrier()
    return path


# -- pieces ----------------------------------------------------------------------------------------------------
def piece_name(batch: int) -> str:
    return f"batch{batch:06d}.h5"


def complete_batches(folder: Path) -> set[int]:
    """The batches whose piece is in `folder` (a piece only gets its name once completely written)."""
    return {int(m.group(1)) for p in folder.iterdir() if (m := PIECE.fullmatch(p.name))} if folder.is_dir() else set()


def write_piece(path: Path, arrays: dict, packed: dict | None = None, durable: bool = True,
                on_point: Callable | None = None) -> None:
    """Store one batch's results atomically: `arrays` (name -> array, first axis = rows) uncompressed, and
    `packed` (name -> (shape, dtype, one `shuffle_deflate`d chunk per row)) as row chunks, into a temporary
    sibling that is fsynced (`durable`) and renamed to `path`. `on_point(partial=True)` is called once the
    temporary file is written, `on_point(partial=False)` once the piece is in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            for name, a in arrays.items():
                h5.create_dataset(name, data=np.asarray(a), track_times=False)
            for name, (shape, dtype, chunks) in (packed or {}).items():
                ds = h5.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), track_times=False,
                                       **COMPRESSION)
                for i, chunk in enumerate(chunks):
                    ds.id.write_direct_chunk((i,) + (0,) * (len(shape) - 1), chunk)
        if on_point:
            on_point(partial=True)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if on_point:
        on_point(partial=False)


class PieceWriter:
    """One process's pieces, batch by batch, into `folder`, stored by a background thread (`write_piece`: HDF5
    file, fsync, rename) while the caller computes the next batches; at most `depth` batches wait. Arrays named
    in `packed` are stored one row per chunk, shuffled and deflated (COMPRESSION) by a pool of threads;
    `merge_batches` then copies those chunks as they are. `on_point(n, partial=...)`: `write_piece`'s points of
    the n-th piece this writer stores. An error of the writing thread is raised by the next `write` or by `close`."""

    def __init__(self, folder: str | Path, packed=(), threads: int | None = None, depth: int = 2,
                 durable: bool = True, on_point: Callable | None = None):
        self.folder, self.durable, self.on_point = Path(folder), durable, on_point
        self.packed, self.depth = set(packed), depth
        self.pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) if self.packed else None
        self.io = ThreadPoolExecutor(1)  # one writer: pieces are stored in the order they come
        self.pending = deque()
        self.written = 0

    def write(self, batch: int, arrays: dict) -> None:
        plain, jobs = {}, {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if name in self.packed and len(a):
                jobs[name] = (a.shape, a.dtype, [self.pool.submit(shuffle_deflate, row) for row in a])
            else:
                plain[name] = a
        self.pending.append(self.io.submit(self._store, batch, plain, jobs))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def _store(self, batch: int, plain: dict, jobs: dict):  # in the writer thread
        packed = {name: (shape, dtype, [f.result() for f in futures]) for name, (shape, dtype, futures) in jobs.items()}
        self.written += 1
        write_piece(self.folder / piece_name(batch), plain, packed, self.durable,
                    partial(self.on_point, self.written) if self.on_point else None)

    def close(self):
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self._shutdown()

    def _shutdown(self):
        self.io.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:  # an error: the batches still waiting are not stored
            self._shutdown()


def gather_batches(piece_paths, names) -> dict:
    """The arrays `names` of every piece, concatenated in the order of `piece_paths` (small per-batch
    results: counts, confusion matrices, pictures)."""
    parts = {n: [] for n in names}
    for p in piece_paths:
        with h5py.File(p, "r") as h5:
            for n in names:
                parts[n].append(h5[n][...])
    return {n: np.concatenate(v) if v else np.zeros((0,)) for n, v in parts.items()}


def merge_batches(piece_paths, out: h5py.File, chunk_rows: dict, in_memory=(), compressed=()) -> dict:
    """Concatenate every batch's arrays in batch order (`piece_paths`: one piece per batch, in order).

    Arrays named in chunk_rows become datasets of `out` (chunked by that many rows, written in one pass
    with no timestamps, so the file is the same bytes whatever process wrote which piece; those named in
    `compressed` losslessly with byte shuffling + gzip level 1, one row per chunk: chunks a PieceWriter
    already packed are copied as they are, others are compressed here); those named in in_memory are
    returned as numpy arrays. Two passes over the pieces (shapes, then data), one file open at a time."""
    piece_paths = list(piece_paths)
    rows, first = dict.fromkeys(chunk_rows, 0), {}
    for p in piece_paths:
        with h5py.File(p, "r") as h5:
            for n in chunk_rows:
                rows[n] += h5[n].shape[0]
                first.setdefault(n, (h5[n].shape[1:], h5[n].dtype))
    datasets = {}
    for n, chunk in chunk_rows.items():
        tail, dtype = first[n]
        shape = (rows[n], *tail)
        chunks = (max(1, min(chunk, rows[n])), *tail) if rows[n] else None
        if n in compressed and chunks and chunks[0] != 1:
            raise ValueError(f"merge_batches: compressed array {n} must be chunked one row per chunk")
        pack = COMPRESSION if n in compressed and chunks else {}
        datasets[n] = out.create_dataset(n, shape=shape, dtype=dtype, chunks=chunks, track_times=False, **pack)
    pos = dict.fromkeys(chunk_rows, 0)
    memory = {n: [] for n in in_memory}
    for p in piece_paths:
        with h5py.File(p, "r") as h5:
            for n in chunk_rows:
                src = h5[n]
                if n in compressed and _is_row_packed(src):  # copy the packed rows, no recompression
                    zeros = (0,) * (src.ndim - 1)
                    for i in range(len(src)):
                        mask, chunk = src.id.read_direct_chunk((i, *zeros))
                        datasets[n].id.write_direct_chunk((pos[n] + i, *zeros), chunk, mask)
                    pos[n] += len(src)
                    continue
                a = src[...]
                datasets[n][pos[n]:pos[n] + len(a)] = a
                pos[n] += len(a)
            for n in in_memory:
                memory[n].append(h5[n][...])
    return {n: np.concatenate(v) if v else np.zeros((0,)) for n, v in memory.items()}


class BatchPieces:
    """The batches of a split a stage still has to compute, dealt out to the ranks, and the pieces their
    results go to (see the module docstring).

    `final`: the artifact the pieces build (names the piece folder); `key`: the run's `transfgu.io.fingerprint`; `name`:
    the stage (logs); `packed`: arrays the PieceWriter compresses by threads; `on_point(point, partial=False)`:
    called with (n, partial=True) once the n-th piece of this process is written to its temporary name, (n) once
    it is in place, ("end") before `remove` removes the pieces."""

    def __init__(self, final: Path, dataset, batch_size: int, num_workers: int, key: str, name: str, packed=(),
                 on_point: Callable | None = None):
        self.name, self.packed, self.on_point = name, packed, on_point
        self.dir = piece_dir(Path(final), key)
        self.n_batches = dist.n_batches(len(dataset), batch_size)
        done = dist.broadcast_object(sorted(complete_batches(self.dir)) if dist.is_main() else None)
        done = {b for b in done if b < self.n_batches}
        todo = [b for b in range(self.n_batches) if b not in done]
        self.reused = len(done)
        self.ids = todo[dist.rank()::dist.world_size()]
        self.loader = batch_loader(dataset, batch_size, num_workers, self.ids)
        if done and dist.is_main():
            log.info("%s: resuming from %s: %d of %d batches already done, %d to compute", name, self.dir,
                     len(done), self.n_batches, len(todo))

    def batches(self, desc: str):
        """Yield (batch, save): save(arrays) stores that batch's results as its piece. Ends when every rank
        is done."""
        with PieceWriter(self.dir, self.packed, on_point=self.on_point) as writer:
            for b, batch in zip(self.ids, progress(self.loader, desc=desc)):
                yield batch, partial(writer.write, b)
        dist.barrier()

    def paths(self) -> list:
        """Every batch's piece, in batch order (after `batches`: all of them exist)."""
        missing = sorted(set(range(self.n_batches)) - complete_batches(self.dir))
        if missing:
            raise RuntimeError(f"{self.dir}: no piece for batches {missing[:10]}")
        return [self.dir / piece_name(b) for b in range(self.n_batches)]

    def remove(self):
        """Once the artifact is complete: the pieces are removed (`on_point("end")` before)."""
        if self.on_point:
            self.on_point("end")
        shutil.rmtree(self.dir)
