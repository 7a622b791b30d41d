"""The state of a training run kept across interruptions, for the decoder training (train.py) and DINO pretraining
(pretrain.py), after DINO's `save_on_master` / `restart_from_checkpoint`: named objects (modules, optimizers,
trainers: anything with state_dict / load_state_dict; torch Generators by their get_state / set_state), plain
values (epoch, step, history, the run's key) and every rank's random generators, in one file written atomically by
rank 0. It holds only what torch.load(weights_only=True) reads back (tensors, numbers, strings, lists, tuples,
dicts), and it is only ever loaded that way."""
from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from . import dist
from .io import atomic_output

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """This process's random number generators (the global torch CPU generator: dropout and the DataLoader's
    seeds; CUDA's; numpy's and python's), in types torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The generators of `state` (an `rng_state()`) restored in this process."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, gauss_next = state["python"]
    random.setstate((v, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(states: list) -> None:
    """Every rank's `rng_state()` (in rank order, as saved): rank r takes state r % len(states), with a warning when
    the run that saved them had another number of processes."""
    if len(states) != dist.world_size():
        log.warning("the checkpoint was written by %d process(es), this run has %d: rank r continues with the "
                    "random state of rank r %% %d (dropout masks differ from an uninterrupted run)",
                    len(states), dist.world_size(), len(states))
    set_rng_state(states[dist.rank() % len(states)])


def _state(obj):
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _load(obj, state) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


def save_on_master(path: str | Path, run_variables: dict | None = None, on_written=None, durable: bool = True,
                   **objects) -> None:
    """Keep a run's state in `path`: every rank's random generators (under "rng", gathered: a collective call, made
    by every rank), `run_variables` as they are and each object's state under its name. Rank 0 writes it
    atomically (fsynced first when `durable`); on_written() runs once the file is written, before its rename (a
    fault point). Returns when every rank is past the write."""
    rngs = dist.all_gather_objects(rng_state())
    if dist.is_main():
        state = {**(run_variables or {}), **{name: _state(obj) for name, obj in objects.items()}, "rng": rngs}
        with atomic_output(path, durable=durable) as tmp:
            torch.save(state, tmp)
            if on_written is not None:
                on_written()
    dist.barrier()


def restart_from_checkpoint(path: str | Path, run_variables: dict | None = None, key: str | None = None,
                            **objects) -> bool:
    """Resume from `path` when rank 0 finds it (every rank reads it, with torch.load(weights_only=True)): each
    object loads its state from it and each name of `run_variables` (the saved "rng" included) takes its saved
    value. Returns False, changing nothing, where there is no such file, its "key" is not `key` (when given), or it
    cannot be read that way (a file of an older version: a warning)."""
    if not dist.broadcast_object(Path(path).is_file()):
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning("%s cannot be read as a training state (weights_only; an older version's?): ignored (%s)", path,
                    str(e).splitlines()[0])
        return False
    if key is not None and state.get("key") != key:
        return False
    for name, obj in objects.items():
        _load(obj, state[name])
    for name in run_variables or {}:
        if name in state:
            run_variables[name] = state[name]
    return True
