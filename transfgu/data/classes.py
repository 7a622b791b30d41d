"""The class list of a folder dataset, <root>/classes.yaml:
`classes: [{name: person, kind: thing}, {name: sky, kind: stuff}, ...]`; label PNG value i is class i, 255 is
ignored. A class of kind `background` (at most one, and then no stuff classes) makes the dataset things-only."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputValueError

EXPECTED = "expected `classes: [{name: ..., kind: thing|stuff|background}, ...]` (docs/usage.md, 'Your own images')"
KINDS = ("thing", "stuff", "background")


class ClassEntry(BaseModel):
    """One class: its name and whether it is a thing, stuff or the background."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, coerce_numbers_to_str=True)
    name: str
    kind: Literal[KINDS]


class ClassList(BaseModel):
    """The classes of a folder dataset, in label order."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    classes: list[ClassEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_background_without_stuff(self):
        kinds = self.kinds
        if kinds.count("background") > 1 or ("background" in kinds and "stuff" in kinds):
            raise ValueError(f"kinds must be thing / stuff / background, with at most one background class and "
                             f"then no stuff classes; got {list(kinds)}")
        return self

    @property
    def names(self) -> tuple:
        return tuple(c.name for c in self.classes)

    @property
    def kinds(self) -> tuple:
        return tuple(c.kind for c in self.classes)


def _problem(err: dict, doc) -> str:
    """What is wrong, in words, from the first error of a ValidationError of ClassList."""
    loc = err["loc"]
    if err["type"] == "value_error" and not loc:
        return str(err["ctx"]["error"])
    if len(loc) >= 2 and loc[0] == "classes" and isinstance(loc[1], int):
        i, entry = loc[1], doc["classes"][loc[1]]
        if not isinstance(entry, dict):
            return f"class {i} is {entry!r}; {EXPECTED}"
        where, key = f"class {i} ({entry.get('name', '?')})", loc[2]
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(key), ["name", "kind"], n=1, cutoff=0.0)
            return f"{where}: unknown key '{key}' (valid: name, kind; did you mean {hint[0]}?); {EXPECTED}"
        if err["type"] == "missing":
            return f"{where}: missing key '{key}'; {EXPECTED}"
        valid = "one of " + ", ".join(KINDS) if key == "kind" else "a string"
        return f"{where}: {key}: expected {valid}, got {entry[key]!r}; {EXPECTED}"
    extra = sorted(set(doc) - {"classes"}) if isinstance(doc, dict) else []
    return EXPECTED + (f"; unknown key(s) {extra}" if extra else "")


def load_classes(root) -> ClassList | None:
    """The ClassList of <root>/classes.yaml, None when the folder has none; a one-line InputValueError naming
    the file when it is not valid."""
    path = Path(root) / "classes.yaml"
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputValueError(f"{path}: not valid YAML ({' '.join(str(e).split())}); {EXPECTED}") from None
    try:
        return ClassList.model_validate(doc)
    except ValidationError as e:
        first = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]  # unknown keys first
        raise InputValueError(f"{path}: {_problem(first, doc)}") from None
