"""Checks every stage runs before any work: params.yaml against its schema (unknown keys, missing keys, types,
ranges), then what can be known from the params and the split index alone (a backbone checkpoint that does not
exist, a training batch larger than the train split, a resolution that is not a multiple of the patch size).
Each failure is one line naming the file, the key and what is valid (`transfgu.errors.BadInput`)."""
from __future__ import annotations

import difflib
from pathlib import Path

from transfgu.choices import BACKENDS, DECODES, PRECISIONS
from transfgu.data.tasks import DATASETS, FOLDER, dataset_is_things_only, resolve_task
from transfgu.errors import InputFileNotFound, InputValueError
from transfgu.models.archs import ARCHS


class Check:
    """A leaf of the schema: `describe` says what is valid, `ok(value)` whether a value is."""

    def __init__(self, describe: str, ok, required: bool = True):
        self.describe, self.ok, self.required = describe, ok, required

    def optional(self) -> "Check":
        return Check(self.describe, self.ok, required=False)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo=None, hi=None) -> Check:
    bounds = " ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if x)
    return Check(f"an integer {bounds}".strip(),
                 lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(lo=None, hi=None, lo_open=False) -> Check:
    low = f"> {lo}" if lo_open else f">= {lo}"
    bounds = " and ".join(x for x in (low if lo is not None else "", f"<= {hi}" if hi is not None else "") if x)
    return Check(f"a number {bounds}".strip(),
                 lambda v: _is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) and
                 (hi is None or v <= hi))


def boolean() -> Check:
    return Check("true or false", lambda v: isinstance(v, bool))


def choice(*values) -> Check:
    return Check("one of " + ", ".join(map(str, values)), lambda v: isinstance(v, (str, int)) and
                 not isinstance(v, bool) and v in values)


def text() -> Check:
    return Check("a string", lambda v: isinstance(v, str) and v != "")


def either(*checks: Check) -> Check:
    return Check(" or ".join(c.describe for c in checks), lambda v: any(c.ok(v) for c in checks))


def null() -> Check:
    return Check("null", lambda v: v is None)


def number_list(length=None, lo=None, hi=None, lo_open=False, min_length=1) -> Check:
    item = number(lo, hi, lo_open)
    size = f"{length} " if length else ""
    return Check(f"a list of {size}numbers ({item.describe[2:]})",
                 lambda v: isinstance(v, list) and (len(v) == length if length else len(v) >= min_length)
                 and all(item.ok(x) for x in v))


def int_list(lo=None) -> Check:
    item = integer(lo)
    return Check(f"a non-empty list of integers ({item.describe[3:]})",
                 lambda v: isinstance(v, list) and len(v) > 0 and all(item.ok(x) for x in v))


AUTO_WORKERS = either(choice("auto"), integer(0)).optional()
PRECISION = choice(*PRECISIONS).optional()
DECODE = choice(*DECODES).optional()
LIST_FILE = either(null(), text())

SCHEMA = {
    "seed": integer(0),
    "granularity": integer(1),
    "dataset": {
        "name": choice(*DATASETS, FOLDER),
        "root": text(),
        "R": integer(8),
        "image_list": either(null(), text(), Check("{train: <list file or null>, val: <list file or null>}",
                                                  lambda v: isinstance(v, dict) and set(v) <= {"train", "val"}
                                                  and all(LIST_FILE.ok(x) for x in v.values()))).optional(),
        "skip_bad": boolean().optional(),
        "num_workers": integer(0).optional(),
        "n_things": either(null(), integer(1)).optional(),
        "things_only": boolean().optional(),
        "synthetic": {"n_train": integer(1), "n_val": integer(1), "size": integer(16)},
    },
    "backbone": {
        "arch": choice(*ARCHS),
        "patch_size": choice(8, 16),
        "checkpoint": either(null(), text()).optional(),
    },
    "extract": {
        "window_sizes": either(choice("auto"), number_list(lo=0, hi=1, lo_open=True)),
        "thing_fraction": number(0, 1),
        "stuff_fraction": number(0, 1),
        "batch_size": integer(1),
        "crop_batch": integer(1),
        "precision": PRECISION,
        "num_workers": AUTO_WORKERS,
        "decode": DECODE,
    },
    "cluster": {
        "niter": integer(1),
        "nredo": integer(1).optional(),
        "backend": choice(*BACKENDS).optional(),
    },
    "pseudo": {
        "batch_size": integer(1),
        "grad_scale": either(choice("auto"), number(0, lo_open=True)).optional(),
        "mass": number(0, 1, lo_open=True),
        "precision": PRECISION,
        "num_workers": AUTO_WORKERS,
        "decode": DECODE,
    },
    "train": {
        "epochs": integer(1),
        "batch_size": integer(1),
        "lr": number(0, lo_open=True),
        "weight_decay": number(0),
        "loss_weights": number_list(3, lo=0),
        "bootstrap_start": integer(0),
        "bootstrap_intervals": int_list(lo=1),
        "bootstrap_block": integer(1),
        "dropout": number(0, 1),
        "select_by": choice("val", "last"),
        "precision": PRECISION,
        "num_workers": AUTO_WORKERS,
        "decode": DECODE,
    },
    "evaluate": {
        "batch_size": integer(1),
        "n_pictures": integer(0),
        "patch_kmeans_baseline": boolean().optional(),
        "precision": PRECISION,
        "num_workers": AUTO_WORKERS,
    },
    "launcher": {
        "nproc_per_node": integer(1).optional(),
        "nnodes": integer(1).optional(),
        "rdzv_endpoint": text().optional(),
        "rdzv_id": text().optional(),
    },
}
OPTIONAL_SECTIONS = {"launcher", "dataset.synthetic"}  # a section that may be left out altogether


def _keys(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in schema.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _unknown(path: str, key: str, siblings) -> InputValueError:
    """An unknown key, with the likeliest meant one: a close name in the same section, else the same name in
    another section."""
    section, _, leaf = key.rpartition(".")
    prefix = section + "." if section else ""
    hint = [prefix + k for k in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)]
    if not hint:
        hint = [k for k in _keys(SCHEMA) if k.rpartition(".")[2] == leaf][:1]
    return InputValueError(f"{path}: unknown key {key}" + (f": did you mean {hint[0]}?" if hint else
                                                            f" (valid here: {', '.join(siblings)})"))


def _walk(params, schema: dict, path: str, prefix: str = ""):
    if not isinstance(params, dict):
        raise InputValueError(f"{path}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys, got {params!r}")
    for key in params:
        if key not in schema:
            raise _unknown(path, prefix + str(key), schema)
    for key, spec in schema.items():
        name = prefix + key
        if key not in params:
            if isinstance(spec, dict):
                if name in OPTIONAL_SECTIONS:
                    continue
                raise InputValueError(f"{path}: missing section {name} (keys: {', '.join(spec)})")
            if spec.required:
                raise InputValueError(f"{path}: missing key {name}: expected {spec.describe}")
            continue
        value = params[key]
        if isinstance(spec, dict):
            _walk(value, spec, path, name + ".")
        elif not spec.ok(value):
            raise InputValueError(f"{path}: {name}: expected {spec.describe}, got {value!r}")


def check_params(params, path: str | Path = "params.yaml") -> None:
    """params.yaml against SCHEMA and the rules that tie keys together; a BadInput naming the key otherwise."""
    _walk(params, SCHEMA, str(path))
    d, b = params["dataset"], params["backbone"]
    if d["name"] in ("synthetic", "synthetic-things") and "synthetic" not in d:
        raise InputValueError(f"{path}: missing section dataset.synthetic (keys: n_train, n_val, size), needed by "
                              f"dataset.name {d['name']}")
    if d["R"] % b["patch_size"]:
        raise InputValueError(f"{path}: dataset.R: expected a multiple of backbone.patch_size {b['patch_size']}, "
                              f"got {d['R']}")
    try:
        dataset_is_things_only(d)
        resolve_task(d, int(params["granularity"]))
    except InputValueError as e:
        raise InputValueError(f"{path}: {e}") from None
    checkpoint = b.get("checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise InputFileNotFound(f"{path}: backbone.checkpoint: {checkpoint} does not exist (README, 'Backbone "
                                f"weights'); null = random weights")


def check_index(params, index: dict, path: str | Path = "params.yaml", world_size: int = 1) -> None:
    """What the split index decides: the training batch fits the train split (the last incomplete batch of an
    epoch is dropped, so a larger batch would train on nothing) and divides among the processes."""
    n_train = len(index["splits"]["train"])
    batch = params["train"]["batch_size"]
    if batch > n_train:
        raise InputValueError(f"{path}: train.batch_size {batch} is larger than the {n_train} train images: "
                              f"use at most {n_train}")
    launcher = params.get("launcher") or {}
    world = max(world_size, int(launcher.get("nproc_per_node", 1)) * int(launcher.get("nnodes", 1)))
    if batch % world:
        raise InputValueError(f"{path}: train.batch_size {batch} is not divisible by the {world} processes "
                              f"(launcher.nproc_per_node x nnodes)")
