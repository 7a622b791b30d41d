"""The pipeline's parameters (params.yaml) as one typed configuration.

`load_params()` reads and checks the file once per process; `validate_params(dict)` checks an already parsed
one. Every section is a pydantic model: unknown keys are refused, types are strict (no "12" for an integer, no
true for a number), ranges are Field constraints and choices Literals; the rules that tie keys together are model
validators. A bad value is one line (`transfgu.errors.BadInput`) naming the file and the key, what is valid and
what was given, made from the first error of pydantic's ValidationError by `_message`."""
from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator
from pydantic.fields import FieldInfo

from .choices import BACKENDS, DECODES, LAUNCHERS, PRECISIONS, PROTOCOLS
from .data.tasks import DATASETS, FOLDER, Task, dataset_is_things_only, resolve_task
from .errors import BadInput, InputFileNotFound, InputValueError
from .launch import plan
from .models.archs import ARCHS, resolve_patch

DATASET_NAMES = (*DATASETS, FOLDER)
SYNTHETIC = ("synthetic", "synthetic-things")

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Text = Annotated[str, Field(min_length=1)]
Precision = Literal[PRECISIONS]
Decode = Literal[DECODES]
Workers = Union[Literal["auto"], NonNegInt]


class Section(BaseModel):
    """A section of params.yaml: unknown keys refused, strict types, read-only."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ImageLists(Section):
    train: Optional[Text] = None
    val: Optional[Text] = None


class SyntheticConfig(Section):
    n_train: PosInt
    n_val: PosInt
    size: Annotated[int, Field(ge=16)]


class DatasetConfig(Section):
    name: Literal[DATASET_NAMES]
    root: Text
    R: Annotated[int, Field(ge=8)]
    image_list: Union[None, Text, ImageLists] = None  # a list set shipped for the dataset, or a file per split
    skip_bad: bool = False
    num_workers: NonNegInt = 0
    n_things: Optional[PosInt] = None
    things_only: bool = False
    synthetic: Optional[SyntheticConfig] = None

    @model_validator(mode="after")
    def _shipped_image_list(self):
        if isinstance(self.image_list, str):
            shipped = DATASETS[self.name].image_lists if self.name in DATASETS else {}
            if self.image_list not in shipped:
                raise ValueError(f"dataset.image_list: '{self.image_list}' is not a list set shipped for dataset "
                                 f"'{self.name}' (shipped: {sorted(shipped) or 'none'}); give a name of those or "
                                 f"{{train: <list file>, val: <list file>}}")
        return self


class BackboneConfig(Section):
    arch: Literal[tuple(ARCHS)]
    patch_size: Optional[Literal[8, 14, 16]] = None  # DINO: 8 or 16; DINOv2 / DINOv3: null or their own 14 / 16
    checkpoint: Optional[Text] = None

    @model_validator(mode="after")
    def _patch_fits_the_arch(self):
        try:
            resolve_patch(self.arch, self.patch_size)
        except InputValueError as e:
            raise ValueError(str(e)) from None  # a section's rule: _first_error puts the file's name first
        return self

    @property
    def patch(self) -> int:
        """The patch size in pixels: backbone.patch_size, or the arch's own."""
        return resolve_patch(self.arch, self.patch_size)


class ExtractConfig(Section):
    window_sizes: Union[Literal["auto"], Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)]]
    thing_fraction: Fraction
    stuff_fraction: Fraction
    batch_size: PosInt
    crop_batch: PosInt
    precision: Precision = "auto"
    num_workers: Workers = "auto"
    decode: Decode = "host"


class ClusterConfig(Section):
    niter: PosInt
    nredo: PosInt = 1
    backend: Literal[BACKENDS] = "auto"


class PseudoConfig(Section):
    batch_size: PosInt
    grad_scale: Union[Literal["auto"], Annotated[float, Field(gt=0)]] = "auto"
    mass: Annotated[float, Field(gt=0, le=1)]
    precision: Precision = "fp32"  # bf16 changes a few % of the pseudo labels (docs/usage.md, "Precision")
    num_workers: Workers = "auto"
    decode: Decode = "host"
    # true: the train split's ground truth in the pseudo-mask layout instead of the method's maps (a diagnostic:
    # the bound that train and evaluate reach from perfect pseudo labels; transfgu/oracle.py)
    oracle: bool = False


class TrainConfig(Section):
    epochs: PosInt
    batch_size: PosInt
    lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    loss_weights: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=3, max_length=3)]
    bootstrap_start: NonNegInt
    bootstrap_intervals: Annotated[list[PosInt], Field(min_length=1)]
    bootstrap_block: PosInt
    dropout: Fraction
    select_by: Literal["val", "last"]
    precision: Precision = "auto"
    num_workers: Workers = "auto"
    decode: Decode = "host"


class EvaluateConfig(Section):
    batch_size: PosInt
    n_pictures: NonNegInt
    patch_kmeans_baseline: bool = True
    precision: Precision = "auto"
    num_workers: Workers = "auto"
    crf: bool = True                            # also score the dense-CRF-refined predictions (crf_* metrics)
    protocol: Literal[PROTOCOLS] = "transfgu"  # val resize / crop: TransFGU's square resize or STEGO's


class ProbeConfig(Section):
    """The linear probe stage (stages/probe.py): a 1x1 classifier on the frozen patch features, trained with the
    train labels, scored on val without matching."""
    enabled: bool = True
    epochs: PosInt = 5
    lr: Annotated[float, Field(gt=0)] = 5.0e-3
    batch_size: PosInt = 32
    forward_batch: PosInt = 128
    cache_gb: Annotated[float, Field(ge=0)] = 2.0
    precision: Precision = "auto"
    num_workers: Workers = "auto"


class LauncherConfig(Section):
    nproc_per_node: Union[Literal["auto"], PosInt] = 1  # auto: one process per GPU of the node (transfgu/launch.py)
    nnodes: PosInt = 1
    rdzv_endpoint: Text = "localhost:29400"
    rdzv_id: Text = "transfgu"
    backend: Literal[LAUNCHERS] = "auto"  # auto: slurm inside a Slurm allocation of several nodes, else local


def _file(info: ValidationInfo) -> str:
    return str((info.context or {}).get("path", "params.yaml"))


def _data_checked(info: ValidationInfo) -> bool:
    """Whether the rules that read the dataset's own files run (not for `transfgu predict`, which needs none)."""
    return (info.context or {}).get("check_data", True)


def _outside_queued_workspace(path) -> str:
    """A hint for a relative path that is missing in a queued `dvc exp run`'s temporary workspace (DVC sets DVC_ROOT
    to the project it came from): that workspace holds the files git tracks, not data/ or weight/. '' otherwise."""
    origin = os.environ.get("DVC_ROOT")
    if Path(path).is_absolute() or not origin or Path(origin).resolve() == Path.cwd().resolve():
        return ""
    return (f"; this is a queued experiment, run in DVC's temporary copy {Path.cwd()} of the files git tracks: give "
            f"an absolute path, e.g. {Path(origin).resolve() / path} (docs/usage.md, 'Sweeps')")


class Params(Section):
    """params.yaml. Built by load_params / validate_params, which give the rules below the file's name."""
    seed: NonNegInt
    granularity: PosInt
    dataset: DatasetConfig
    backbone: BackboneConfig
    extract: ExtractConfig
    cluster: ClusterConfig
    pseudo: PseudoConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    probe: ProbeConfig = ProbeConfig()
    launcher: LauncherConfig = LauncherConfig()
    _path: Path = PrivateAttr(default=Path("params.yaml"))
    _task: Optional[Task] = PrivateAttr(default=None)

    # The rules between keys, in the order a new user meets them (pydantic runs them in this order).
    @model_validator(mode="after")
    def _dataset_is_there(self, info: ValidationInfo):
        d = self.dataset
        if d.name in SYNTHETIC and d.synthetic is None:
            raise InputValueError(f"{_file(info)}: missing section dataset.synthetic (keys: n_train, n_val, size), "
                                  f"needed by dataset.name {d.name}")
        if d.name == FOLDER and _data_checked(info) and not Path(d.root).is_dir():
            raise InputFileNotFound(f"{_file(info)}: dataset.root: {d.root} is not a folder (dataset.name folder "
                                    f"reads <root>/images/train and <root>/images/val; docs/usage.md, 'Your own images')"
                                    + _outside_queued_workspace(d.root))
        if d.name not in SYNTHETIC and _data_checked(info) and not Path(d.root).is_dir() \
                and _outside_queued_workspace(d.root):
            raise InputFileNotFound(f"{_file(info)}: dataset.root: {d.root} is not a folder"
                                    + _outside_queued_workspace(d.root))
        return self

    @model_validator(mode="after")
    def _resolution_fits_the_patches(self, info: ValidationInfo):
        R, patch = self.dataset.R, self.backbone.patch
        if R % patch:
            near = sorted({max(patch, R // patch * patch), (R // patch + 1) * patch})
            raise InputValueError(f"{_file(info)}: dataset.R: expected a multiple of the patch size {patch} "
                                  f"({self.backbone.arch}), e.g. {' or '.join(map(str, near))}, got {R}")
        return self

    @model_validator(mode="after")
    def _task_resolves(self, info: ValidationInfo):
        if not _data_checked(info):
            return self
        dataset_is_things_only(self.dataset)  # a bad classes.yaml: its own message, naming that file
        try:
            self._task = resolve_task(self.dataset, self.granularity)
        except InputValueError as e:
            raise InputValueError(f"{_file(info)}: {e}") from None
        return self

    @model_validator(mode="after")
    def _checkpoint_exists(self, info: ValidationInfo):
        checkpoint = self.backbone.checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            raise InputFileNotFound(f"{_file(info)}: backbone.checkpoint: {checkpoint} does not exist (docs/usage.md, "
                                    f"'Backbone weights'); null = random weights" + _outside_queued_workspace(checkpoint))
        return self

    @property
    def path(self) -> Path:
        """The file the params came from, for messages."""
        return self._path

    @property
    def task(self) -> Task:
        """The Task of (dataset, granularity), resolved once when the params were checked (None when the data's
        files were not checked)."""
        return self._task

    @property
    def things_only(self) -> bool:
        """Whether the dataset is things-only (dataset_is_things_only: decided by the dataset)."""
        return self._task.things_only

    def value(self, dotted: str):
        """The value at a dotted key ("dataset.name", "backbone"); a section as a plain dict."""
        node = self
        for key in dotted.split("."):
            node = getattr(node, key)
        return node.model_dump() if isinstance(node, BaseModel) else node

    def check_index(self, index: dict, world_size: int = 1) -> None:
        """What the split index decides: the training batch fits the train split (the last incomplete batch of an
        epoch is dropped, so a larger batch would train on nothing) and divides among the processes."""
        n_train, batch = len(index["splits"]["train"]), self.train.batch_size
        if batch > n_train:
            raise InputValueError(f"{self.path}: train.batch_size {batch} is larger than the {n_train} train "
                                  f"images: use at most {n_train}")
        world = max(world_size, plan(self.launcher).world)
        if batch % world:
            raise InputValueError(f"{self.path}: train.batch_size {batch} is not divisible by the {world} processes "
                                  f"(launcher.nproc_per_node x nodes)")


# -- messages ---------------------------------------------------------------------------------------------------
def _flat(meta) -> list:
    """Constraint objects (annotated_types Ge, Gt, Le, MinLen, ...) of Annotated / Field metadata."""
    out = []
    for m in meta:
        out += _flat(m.metadata) if isinstance(m, FieldInfo) else [m]
    return out


def _bounds(meta) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(f"{sign} {getattr(m, attr)}" for m in meta for attr, sign in words.items()
                        if hasattr(m, attr))


def _length(meta) -> tuple:
    lo = next((m.min_length for m in meta if hasattr(m, "min_length")), None)
    hi = next((m.max_length for m in meta if hasattr(m, "max_length")), None)
    return lo, hi


def describe(tp, meta=()) -> str:
    """What a field of this type and these constraints accepts, in words: "an integer >= 1", "one of a, b"."""
    meta = _flat(meta)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return describe(args[0], [*meta, *args[1:]])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        item = typing.get_args(args[0]) if typing.get_origin(args[0]) is Annotated else args
        lo, hi = _length(meta)
        kind = "integers" if item[0] is int else "numbers"
        what = f"list of {lo} {kind}" if lo == hi else f"{'non-empty ' if lo else ''}list of {kind}"
        bounds = _bounds(_flat(item[1:]))
        return f"a {what}" + (f" ({bounds})" if bounds else "")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(f"{k}: {describe(f.annotation, f.metadata)}" for k, f in tp.model_fields.items()) + "}"
    simple = {type(None): "null", bool: "true or false", str: "a string", int: "an integer", float: "a number"}
    return " ".join(x for x in (simple.get(tp, str(tp)), _bounds(meta)) if x)


def _section(tp):
    """The model of a section field (a model, or an optional one), else None."""
    union = typing.get_origin(tp) in (Union, types.UnionType)
    members = [t for t in typing.get_args(tp) if t is not type(None)] if union else [tp]
    ok = len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel)
    return members[0] if ok else None


def _all_keys(model, prefix="") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        out.append(prefix + name)
        if _section(f.annotation):
            out += _all_keys(_section(f.annotation), f"{prefix}{name}.")
    return out


def _message(err: dict, data, path: str) -> str:
    """One line for one pydantic error of Params: the file, the dotted key, what is valid and what was given."""
    model, field, keys, given = Params, None, [], data
    for part in err["loc"]:  # walk down the sections to the field the error is about
        if model is None or part not in model.model_fields:
            break
        field, keys = model.model_fields[part], keys + [part]
        given = given.get(part) if isinstance(given, dict) else None
        model = _section(field.annotation)
    key = ".".join(keys)
    if err["type"] == "extra_forbidden" and model is not None and len(err["loc"]) == len(keys) + 1:
        name = err["loc"][len(keys)]
        section = key + "." if key else ""
        hint = [section + m for m in difflib.get_close_matches(str(name), list(model.model_fields), n=1, cutoff=0.6)]
        hint = hint or [k for k in _all_keys(Params) if k.rpartition(".")[2] == name][:1]
        return f"{path}: unknown key {section}{name}" + (f": did you mean {hint[0]}?" if hint else
                                                         f" (valid here: {', '.join(model.model_fields)})")
    if not keys:
        return f"{path}: the file must be a mapping of keys, got {data!r}"
    if err["type"] == "missing":
        if model is not None:
            return f"{path}: missing section {key} (keys: {', '.join(model.model_fields)})"
        return f"{path}: missing key {key}: expected {describe(field.annotation, field.metadata)}"
    if model is not None:
        return f"{path}: {key} must be a mapping of keys ({', '.join(model.model_fields)}), got {given!r}"
    return f"{path}: {key}: expected {describe(field.annotation, field.metadata)}, got {given!r}"


def _first_error(errors: list, data, path) -> BadInput:
    """The first of pydantic's errors (an unknown key before anything else) as a one-line BadInput."""
    err = sorted(errors, key=lambda err: err["type"] != "extra_forbidden")[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, BadInput):  # a rule between keys: its message is whole already
        return cause
    if err["type"] == "value_error":  # a section's own rule (a ValueError): its message names the key
        return InputValueError(f"{path}: {cause}")
    return InputValueError(_message(err, data, str(path)))


def validate_params(data: dict, path="params.yaml", check_data: bool = True) -> Params:
    """Params from an already parsed params.yaml; a one-line BadInput naming the file and the key otherwise.
    `check_data=False` leaves out the rules that read the dataset's files (a folder's classes.yaml; `task` is
    then None)."""
    try:
        params = Params.model_validate(data, context={"path": str(path), "check_data": check_data})
    except ValidationError as e:
        raise _first_error(e.errors(), data, path) from None
    params._path = Path(path)
    return params


_CACHE: dict = {}


def load_params(path=None, check_data: bool = True) -> Params:
    """Params of `path` (default $TRANSFGU_PARAMS, else params.yaml), read and checked once per process for
    each (file, modification time); `check_data` as for validate_params."""
    path = Path(path or os.environ.get("TRANSFGU_PARAMS") or "params.yaml")
    try:
        key = (path.resolve(), path.stat().st_mtime_ns, check_data)
    except FileNotFoundError:
        raise InputFileNotFound(f"{path} not found: run the stages from the project root") from None
    if key not in _CACHE:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise InputValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        _CACHE[key] = validate_params(data, path, check_data)
    return _CACHE[key]


def dataset_config(data: dict, path="params.yaml") -> DatasetConfig:
    """A DatasetConfig from a `dataset` section alone, with the messages of validate_params."""
    try:
        return DatasetConfig.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("dataset", *err["loc"])} for err in e.errors()]
        raise _first_error(errors, {"dataset": data}, path) from None
