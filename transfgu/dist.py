"""Several processes through torchrun (NCCL on GPUs, gloo on CPUs), and the same results as one.

Work is split by whole batches: batch b of the single-process order goes to rank b % world, so every
batch is computed exactly as it would be by one process, and outputs assembled in batch order are the
same whatever the world size."""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as td


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
