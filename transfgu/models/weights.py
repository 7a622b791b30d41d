"""Loading weights with strict matching: every key present, none extra, every shape equal."""
from __future__ import annotations

from torch import nn

from ..errors import InputValueError


def load_strict(model: nn.Module, state: dict, context: str) -> None:
    """Load `state` into `model`, or raise a ValueError starting with `context` that lists (up to five of)
    the missing keys, the unexpected keys and the wrong shapes as (key, got, expected)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise InputValueError(
            f"{context}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, wrong shapes "
            f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]} (got, expected)")
    model.load_state_dict(state, strict=True)
