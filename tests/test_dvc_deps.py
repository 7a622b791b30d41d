"""dvc.yaml lists exactly the code each stage runs: its script (the stage command) and every
module of the project they import, directly or not. A missing file would let DVC serve a stale result after a
change there; an extra one re-runs a stage for nothing. The import closure is computed from the source (ast),
not by importing.

`python tests/test_dvc_deps.py` rewrites dvc.yaml's code deps of every stage to its import closure (data deps and
comments are kept)."""
import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
CODE_ROOTS = ("stages", "transfgu")


def module_file(name: str) -> Path | None:
    """The project file of a module name as the stage scripts see it (stages/ and the project root on the
    path), or None when it is not the project's."""
    parts = name.split(".")
    if parts[0] == "transfgu":
        base = REPO.joinpath(*parts)
    elif len(parts) == 1 and (REPO / "stages" / f"{name}.py").is_file():
        base = REPO / "stages" / name
    else:
        return None
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] == "stages":
        return path.stem
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file can load, at any depth of the file (lazy imports too);
    `from a import b` counts a.b when b is a submodule. Importing a.b.c also runs a and a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def closure(*scripts: Path) -> set[Path]:
    seen, todo = set(), list(scripts)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            f = module_file(name)
            if f is not None and f not in seen:
                todo.append(f)
    return seen


def stage_code(stage: str) -> set[str]:
    return {str(p.relative_to(REPO)) for p in closure(REPO / "stages" / f"{stage}.py")}


def listed_code(deps) -> set[str]:
    """The .py files a stage's deps name under stages/ and transfgu/ (folders expanded)."""
    files = set()
    for dep in deps:
        dep = dep if isinstance(dep, str) else next(iter(dep))
        path = REPO / dep
        if Path(dep).parts[0] not in CODE_ROOTS:
            continue
        if path.is_dir():
            files.update(str(p.relative_to(REPO)) for p in path.rglob("*.py"))
        else:
            files.add(dep)
    return files


@pytest.fixture(scope="module")
def dvc_stages():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_deps_are_exactly_the_code_the_stage_imports(dvc_stages, stage):
    needed, listed = stage_code(stage), listed_code(dvc_stages[stage]["deps"])
    assert not needed - listed, f"dvc.yaml: stage {stage} runs code it does not depend on: {sorted(needed - listed)}"
    assert not listed - needed, f"dvc.yaml: stage {stage} depends on code it never imports: {sorted(listed - needed)}"


def test_every_listed_dependency_exists(dvc_stages):
    for stage, spec in dvc_stages.items():
        for dep in spec["deps"]:
            dep = dep if isinstance(dep, str) else next(iter(dep))
            if Path(dep).parts[0] in CODE_ROOTS:
                assert (REPO / dep).exists(), f"dvc.yaml: {stage} depends on {dep}, which does not exist"


def test_closure_follows_relative_package_and_lazy_imports(tmp_path):
    """The closure itself, on known files: evaluate reaches the k-means (through baselines, a relative import)
    and the decoder; the data package's tasks pull the synthetic generator's class names."""
    evaluate = stage_code("evaluate")
    assert {"transfgu/baselines.py", "transfgu/cluster.py", "transfgu/models/decoder.py", "transfgu/__init__.py",
            "transfgu/models/__init__.py", "transfgu/stage.py"} <= evaluate
    assert "transfgu/data/synthetic.py" in stage_code("cluster")
    assert "transfgu/train.py" not in evaluate and "transfgu/dino.py" not in evaluate


def write_deps(path: Path = REPO / "dvc.yaml") -> None:
    """Rewrite each stage's code deps (stages/, transfgu/ .py files) to its import closure, in place."""
    lines, out, stage, i = path.read_text().splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  (\w+):\s*$", line)
        if m:
            stage = m.group(1)
        if line.strip() == "deps:" and stage in STAGES:
            out.append(line)
            i += 1
            data = []
            while i < len(lines) and lines[i].startswith("      - "):
                dep = lines[i].strip()[2:]
                if Path(dep).parts[0] not in CODE_ROOTS or not dep.endswith(".py"):
                    data.append(lines[i])
                i += 1
            out += [f"      - {c}\n" for c in sorted(stage_code(stage))] + data
            continue
        out.append(line)
        i += 1
    path.write_text("".join(out))


if __name__ == "__main__":
    write_deps()
