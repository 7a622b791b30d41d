"""Fault injection for the resume tests: kill this process with SIGKILL at a chosen point of a stage.

Enabled by one environment variable (unset in normal runs; the check is a dictionary lookup):

    TRANSFGU_FAULT=<stage>:<n>[:partial][@<rank>]     e.g. extract:2, pseudo:1:partial, train:3@1
    TRANSFGU_FAULT=<stage>:end[@<rank>]

- `<stage>`: extract, pseudo, evaluate (units: batch pieces) or train (units: epoch checkpoints).
- `<n>`: the n-th unit this process completes (counted from 1 in every run, so a resumed run can be killed
  again with the same setting): SIGKILL right after it is durably stored (renamed into place).
- `partial`: SIGKILL while storing the n-th unit: its temporary file is written, not yet renamed.
- `end`: SIGKILL once the stage's artifacts are complete, before its pieces / checkpoint are removed.
- `@<rank>`: only that torchrun rank (default: every rank reaching the point).

SIGKILL is what a crash, the OOM killer or `kill -9` does: no `finally`, no atexit, no flush. A resumed run
must continue from what was stored before the kill (tests/test_resume.py)."""
from __future__ import annotations

import os
import signal
import sys
from functools import partial

ENV = "TRANSFGU_FAULT"


def _parse(spec: str):
    spec, _, rank = spec.partition("@")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (parts[1] != "end" and not parts[1].isdigit()) \
            or (len(parts) == 3 and (parts[2] != "partial" or parts[1] == "end")):
        raise ValueError(f"{ENV}={spec!r}: expected <stage>:<n>[:partial][@<rank>] or <stage>:end[@<rank>]")
    return parts[0], parts[1], len(parts) == 3, int(rank) if rank else None


def reached(stage: str, point, partial: bool = False) -> None:
    """A fault point: `point` is the count of units this process has completed (int) or "end". SIGKILLs
    this process when TRANSFGU_FAULT names this point, else returns at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, at, at_partial, rank = _parse(spec)
    if name != stage or at != str(point) or at_partial != partial:
        return
    if rank is not None and rank != int(os.environ.get("RANK", 0)):
        return
    sys.stderr.write(f"{ENV}={spec}: SIGKILL {stage} (pid {os.getpid()})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hook(stage: str):
    """`reached` for one stage: the `on_point` a stage passes to transfgu.pieces.BatchPieces."""
    return partial(reached, stage)
