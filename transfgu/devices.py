"""Moving host tensors to a device without making the host wait for it."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without a stream synchronisation. A plain `.to("cuda")` of pageable memory
    makes the host wait until the GPU has run everything queued before it; the augmentations draw their random
    numbers on the host, so each step made dozens of such waits. On CUDA the tensor goes through pinned memory,
    asynchronously; elsewhere it is moved as usual. The values are the same either way."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
