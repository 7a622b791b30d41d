"""Several processes through torchrun (NCCL on GPUs, gloo on CPUs), and the same results as one.

Work is split by whole batches: batch b of the single-process order goes to rank b % world, so every
batch is computed exactly as it would be by one process, and outputs assembled in batch order are the
same whatever the world size."""
from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as td
from tqdm import tqdm



def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def init_from_env() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a plain
    `python` run stays a single process. Returns this process's device."""
    device = local_device()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


PROGRESS_ENV = "TRANSFGU_PROGRESS"                # auto (default) | bar | lines | off
PROGRESS_EVERY_ENV = "TRANSFGU_PROGRESS_EVERY"    # percent between two plain lines (default 10)
PROGRESS_SECONDS_ENV = "TRANSFGU_PROGRESS_SECONDS"  # and at least this many seconds (default 10)
progress_log = logging.getLogger("transfgu.progress")


def progress_mode(stream=None) -> str:
    """'bar' when `stream` (default stderr) is a terminal, else 'lines'; TRANSFGU_PROGRESS=bar|lines|off overrides."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"{PROGRESS_ENV}={mode!r}: expected auto, bar, lines or off")
    if mode == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


class LineProgress:
    """The non-terminal progress of a loop: one log line (logger transfgu.progress, INFO) each time another
    `every` percent of `total` items is done (without a total: at 1, 2, 4, 8... items), but not within
    `min_seconds` of the previous line (or of the start), so short loops stay silent; the last item gets a line
    when an earlier one had one or the loop took `min_seconds`. No carriage returns: a log piped to a file stays
    readable. Iterable like a tqdm bar; set_postfix adds values to the next line."""

    def __init__(self, iterable, desc: str = "", total=None, unit: str = "it", every: float = 10.0,
                 min_seconds: float = 10.0):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total, self.every, self.min_seconds = total, max(float(every), 1e-9), float(min_seconds)
        self.n, self.postfix, self.t0, self._next = 0, "", time.time(), 1
        self._last_time, self._lines, self._last_logged = self.t0, 0, 0

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now):
        dt = now - self.t0
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = f", {self.n / dt:.3g} {self.unit}/s" if dt > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        progress_log.info("%s: %s%s in %.1f s%s%s", self.desc, done, pct, dt, rate, extra)
        self._last_time, self._lines, self._last_logged = now, self._lines + 1, self.n

    def _final(self, now):
        if self.n != self._last_logged and (self._lines or now - self.t0 >= self.min_seconds):
            self._line(now)

    def _tick(self):
        now = time.time()
        if self.total:
            if self.n == self.total:
                return self._final(now)
            step = self.total * self.every / 100
            due = self.n < self.total and int(self.n / step) > int((self.n - 1) / step)
        else:
            due = self.n >= self._next
            if due:
                self._next *= 2
        if due and now - self._last_time >= self.min_seconds:
            self._line(now)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            self._tick()
        self.close()

    def update(self, n: int = 1):
        self.n += n
        self._tick()

    def close(self):
        if not self.total:  # the end of a loop of unknown length
            self._final(time.time())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, desc: str = "", total=None, unit: str = "it", disable: bool = False, **kwargs):
    """The progress of a loop, shown by rank 0 only: a tqdm bar when stderr is a terminal, else plain log lines,
    one per TRANSFGU_PROGRESS_EVERY percent (default 10) and at most one per TRANSFGU_PROGRESS_SECONDS (default
    10; see LineProgress). TRANSFGU_PROGRESS=bar, lines or off forces a mode. Other keyword arguments go to tqdm."""
    mode = "off" if disable or not is_main() else progress_mode()
    if mode == "lines":
        return LineProgress(iterable, desc, total, unit, float(os.environ.get(PROGRESS_EVERY_ENV, 10)),
                            float(os.environ.get(PROGRESS_SECONDS_ENV, 10)))
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=mode == "off", **kwargs)


def barrier():
    if td.is_initialized():
        td.barrier()


def shutdown():
    if td.is_initialized():
        td.destroy_process_group()


def n_batches(n_items: int, batch_size: int) -> int:
    return -(-n_items // batch_size)


def my_batches(n_items: int, batch_size: int) -> dict[int, list[int]]:
    """This rank's batches {batch id b: item indices}: batch b = items [b*B, (b+1)*B), given to rank b % world."""
    return {b: list(range(b * batch_size, min((b + 1) * batch_size, n_items)))
            for b in range(rank(), n_batches(n_items, batch_size), world_size())}


def all_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (exact for integer arrays)."""
    if not td.is_initialized():
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float64 if array.dtype.kind == "f" else torch.int64)
    if td.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t)
    return t.cpu().numpy().astype(array.dtype)


def broadcast_object(obj):
    """rank 0's obj on every rank."""
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's obj, in rank order."""
    if not td.is_initialized():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of n items in epoch `epoch`: a permutation drawn from (seed, epoch) alone, so a resumed run
    sees the same order without replaying the epochs before (GlobalBatchSampler; pretrain's batches)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Training batches of a global size over all ranks: each epoch a permutation seeded by (seed, epoch)
    is cut into global batches, the last incomplete one dropped, and this rank takes its contiguous
    slice of each. The global batches do not depend on the world size, and every rank's slice has the
    same size, so averaging gradients over ranks gives the global batch's mean gradient."""

    def __init__(self, n_items: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_items, global_batch, seed
        self.local = global_batch // world_size()  # Params.check_index: global_batch divides and fits
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        order = epoch_permutation(self.n, self.seed, self.epoch)
        return [order[s:s + self.global_batch].tolist() for s in range(0, self.n - self.global_batch + 1,
                                                                        self.global_batch)]

    def __iter__(self):
        r = rank()
        for batch in self.global_batches():
            yield batch[r * self.local:(r + 1) * self.local]

    def __len__(self):
        return self.n // self.global_batch
