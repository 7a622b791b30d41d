"""Loading weights with strict matching: every key present, none extra, every shape equal."""
from __future__ import annotations

from torch import nn

from ..errors import InputValueError


def wrong_layout(state: dict, expected: dict) -> str | None:
    """None when `state` has exactly the keys of `expected` (key -> shape) with those shapes; else one line listing
    (up to five of) the missing keys, the unexpected keys and the wrong shapes as (key, got, expected)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return None
    return (f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, wrong shapes "
            f"{[(k, tuple(state[k].shape), tuple(expected[k])) for k in wrong[:5]]} (got, expected)")


def load_strict(model: nn.Module, state: dict, context: str) -> None:
    """Load `state` into `model`, or raise a ValueError starting with `context` that lists (up to five of)
    the missing keys, the unexpected keys and the wrong shapes as (key, got, expected)."""
    problem = wrong_layout(state, {k: v.shape for k, v in model.state_dict().items()})
    if problem:
        raise InputValueError(f"{context}: {problem}")
    model.load_state_dict(state, strict=True)
