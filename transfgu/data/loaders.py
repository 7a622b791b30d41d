"""DataLoaders over whole batches of a split (batch b = items [b*B, (b+1)*B)), the unit the stages share out."""
from __future__ import annotations

import torch

from .. import dist


def batch_loader(dataset, batch_size: int, num_workers: int, batches) -> torch.utils.data.DataLoader:
    """A DataLoader over the given batches of a split, in that order (batch b = items [b*B, (b+1)*B))."""
    n = len(dataset)
    sampler = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in batches]
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0 and bool(sampler),
                                       collate_fn=getattr(dataset, "collate", None))


def my_loader(dataset, batch_size: int, num_workers: int):
    """This rank's share of the batches of a split, in order, as (global batch ids, DataLoader)."""
    mine = list(dist.my_batches(len(dataset), batch_size))
    return mine, batch_loader(dataset, batch_size, num_workers, mine)
