"""The shard protocol of the sharded stages (extract, pseudo, evaluate).

Every process (torchrun rank) takes every world-th batch of a split (`dist.my_batches`) and writes its
results batch by batch to its own shard file in a folder all ranks share; rank 0 then concatenates the
batches in batch order (`merge_batches`), so the artifact is the same bytes whatever the number of
processes. Big per-image arrays can be compressed by threads while the device computes the next batches
(`ShardWriter(packed=...)`), and are then copied chunk by chunk without a second compression pass."""
from __future__ import annotations

import os
import shutil
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import torch

from . import dist
from .dist import progress


# Lossless packing of the big per-image arrays (pseudo-mask gradient terms): HDF5's byte shuffle, then
# deflate level 1, one row (image) per chunk.
COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)


def shuffle_deflate(row: np.ndarray) -> bytes:
    """One chunk's bytes as HDF5's shuffle + deflate(1) filters store them: byte k of every element, for
    k = 0 .. itemsize - 1, then a zlib stream. zlib releases the GIL, so threads compress in parallel."""
    row = np.ascontiguousarray(row)
    planes = row.reshape(-1).view(np.uint8).reshape(-1, row.dtype.itemsize).T
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), 1)


def _is_row_packed(ds: h5py.Dataset) -> bool:
    return ds.chunks == (1, *ds.shape[1:]) and ds.compression == "gzip" and ds.compression_opts == 1 and ds.shuffle


def write_batch(shard: h5py.File, batch: int, arrays: dict) -> None:
    """Store one batch's results (name -> array, first axis = rows) in a rank's shard file, uncompressed."""
    group = shard.create_group(f"batch{batch}")
    for name, a in arrays.items():
        group.create_dataset(name, data=np.asarray(a))


class ShardWriter:
    """A rank's shard file, batch by batch. Arrays named in `packed` are stored one row per chunk,
    shuffled and deflated (COMPRESSION) by a pool of threads while the caller computes the next batches
    (at most `depth` batches wait); `merge_batches` then copies those chunks as they are. Other arrays are
    written at once, uncompressed."""

    def __init__(self, path: str | Path, packed=(), threads: int | None = None, depth: int = 2):
        self.h5 = h5py.File(path, "w")
        self.packed, self.depth = set(packed), depth
        self.pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) if self.packed else None
        self.pending = deque()

    def write(self, batch: int, arrays: dict) -> None:
        group = self.h5.create_group(f"batch{batch}")
        jobs = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if name in self.packed and len(a):
                jobs[name] = (a.shape, a.dtype, [self.pool.submit(shuffle_deflate, row) for row in a])
            else:
                group.create_dataset(name, data=a)
        self.pending.append((group, jobs))
        while len(self.pending) > self.depth:
            self._flush_one()

    def _flush_one(self):
        group, jobs = self.pending.popleft()
        for name, (shape, dtype, futures) in jobs.items():
            ds = group.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), **COMPRESSION)
            for i, f in enumerate(futures):
                ds.id.write_direct_chunk((i,) + (0,) * (len(shape) - 1), f.result())

    def close(self):
        try:
            while self.pending:
                self._flush_one()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_batches(shard_paths, n_batches: int, out: h5py.File, chunk_rows: dict, in_memory=(),
                  compressed=()) -> dict:
    """Concatenate every batch's arrays in batch order, batch b read from shard b % len(shard_paths).

    Arrays named in chunk_rows become datasets of `out` (chunked by that many rows, written in one pass
    with no timestamps, so the file is the same bytes whatever the number of shards; those named in
    `compressed` losslessly with byte shuffling + gzip level 1, one row per chunk: chunks a ShardWriter
    already packed are copied as they are, others are compressed here); those named in in_memory are
    returned as numpy arrays."""
    shards = [h5py.File(p, "r") for p in shard_paths]
    try:
        batch = lambda b: shards[b % len(shards)][f"batch{b}"]  # noqa: E731
        names = list(chunk_rows) + list(in_memory)
        rows = {n: sum(batch(b)[n].shape[0] for b in range(n_batches)) for n in names}
        first = {n: batch(0)[n] for n in names}
        datasets = {}
        for n, chunk in chunk_rows.items():
            shape = (rows[n], *first[n].shape[1:])
            chunks = (max(1, min(chunk, rows[n])), *first[n].shape[1:]) if rows[n] else None
            if n in compressed and chunks and chunks[0] != 1:
                raise ValueError(f"merge_batches: compressed array {n} must be chunked one row per chunk")
            pack = COMPRESSION if n in compressed and chunks else {}
            datasets[n] = out.create_dataset(n, shape=shape, dtype=first[n].dtype, chunks=chunks, track_times=False,
                                             **pack)
        pos = dict.fromkeys(chunk_rows, 0)
        memory = {n: [] for n in in_memory}
        for b in range(n_batches):
            for n in chunk_rows:
                src = batch(b)[n]
                if n in compressed and _is_row_packed(src):  # copy the packed rows, no recompression
                    tail = (0,) * (src.ndim - 1)
                    for i in range(len(src)):
                        mask, chunk = src.id.read_direct_chunk((i, *tail))
                        datasets[n].id.write_direct_chunk((pos[n] + i, *tail), chunk, mask)
                    pos[n] += len(src)
                    continue
                a = src[...]
                datasets[n][pos[n]:pos[n] + len(a)] = a
                pos[n] += len(a)
            for n in in_memory:
                memory[n].append(batch(b)[n][...])
        return {n: np.concatenate(v) if v else np.zeros((0,)) for n, v in memory.items()}
    finally:
        for f in shards:
            f.close()


def my_loader(dataset, batch_size: int, num_workers: int):
    """This rank's share of the batches of a split, in order, as (global batch ids, DataLoader)."""
    mine = dist.my_batches(len(dataset), batch_size)
    return list(mine), torch.utils.data.DataLoader(dataset, batch_sampler=list(mine.values()),
                                                   num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                                   persistent_workers=num_workers > 0)


def shard_dir(final: Path) -> Path:
    """A folder shared by all ranks for their shards of `final` (stale ones from crashed runs removed)."""
    run_id = dist.broadcast_object(os.getpid())
    path = final.parent / f".{final.name}.shards-{run_id}"
    if dist.is_main():
        for old in final.parent.glob(f".{final.name}.shards-*"):
            shutil.rmtree(old)
        path.mkdir(parents=True)
    dist.barrier()
    return path


class BatchShards:
    """This rank's batches of a split (every world-th one) and the shard file their results go to, in a
    folder shared by all ranks; rank 0 then assembles the shards (merge_batches)."""

    def __init__(self, final: Path, dataset, batch_size: int, num_workers: int, packed=()):
        self.dir, self.packed = shard_dir(final), packed
        self.n_batches = dist.n_batches(len(dataset), batch_size)
        self.ids, self.loader = my_loader(dataset, batch_size, num_workers)

    def batches(self, desc: str):
        """Yield (batch, save): save(arrays) stores that batch's results. Ends when every rank is done."""
        with ShardWriter(self.dir / f"rank{dist.rank()}.h5", self.packed) as shard:
            for b, batch in zip(self.ids, progress(self.loader, desc=desc)):
                yield batch, partial(shard.write, b)
        dist.barrier()

    def paths(self) -> list:
        return [self.dir / f"rank{r}.h5" for r in range(dist.world_size())]

    def remove(self):
        shutil.rmtree(self.dir)
