"""Numeric precision of the network forwards: float32, or bfloat16 autocast (mixed precision).

Every stage that runs a network has a `precision` param: `fp32`, `bf16`, or `auto` (= bf16 on a GPU,
fp32 on the CPU, where bf16 is fast only on processors with bf16 units). bf16 autocast runs the matmuls
and convolutions in bfloat16 and keeps softmax, norms and reductions in float32; weights stay float32.
Which stages may use it, and how far their outputs move, is stated in docs/usage.md ("Precision") and checked in
tests/test_precision.py."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .choices import PRECISIONS  # noqa: F401 (the choices, for the callers that list them)


def resolve_precision(value: str, device) -> str:
    """'fp32' or 'bf16' for a precision of PRECISIONS on `device` (auto: bf16 on a GPU); the config checked it."""
    if value == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return value


def autocast(precision: str, device):
    """bf16 autocast on `device` (a device, its type, or a tensor's device) for 'bf16'; nothing for 'fp32'."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
