"""dvc.yaml's deps cannot drift from the code: every first-party module a stage imports (transitively, lazy imports
included) is covered by one of its deps, and no stage script imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT, pipeline_stages

PACKAGE = "headline_bench"
SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """The file of a first-party module (`headline_bench.x.y`): x/y.py or x/y/__init__.py; None if it is not one."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imports_of(path: Path) -> set[Path]:
    """First-party files that `path` imports anywhere in it (top level or inside functions), with their packages' __init__."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import submodule`
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                file = module_file(".".join(parts[:i]))
                if file:
                    found.add(file)
    return found


def closure(script: Path) -> set[Path]:
    """Every first-party file a stage script runs, following imports transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for file in imports_of(todo.pop()):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    return seen


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    """The files no dep covers (a dep covers itself and, if a folder, everything under it)."""
    paths = [(ROOT / d).resolve() for d in deps]
    return sorted(str(f.relative_to(ROOT)) for f in files if not any(f == p or p in f.parents for p in paths))


def stages() -> dict[str, tuple[Path, list[str]]]:
    """{stage: (its script, its deps)} from dvc.yaml and pipelines/*/dvc.yaml (foreach stages once, with their templated deps as written)."""
    out = {}
    for name, stage in pipeline_stages().items():
        body = stage.get("do", stage)
        script = ROOT / body["cmd"].split()[1]
        out[name] = (script, [d for d in body.get("deps", []) if "${" not in d or d.startswith("data/")])
    return out


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_cover_its_imports(name: str) -> None:
    script, deps = stages()[name]
    assert script.relative_to(ROOT).as_posix() in deps, f"{name}: its own script is not a dep"
    missing = uncovered(closure(script), deps)
    assert not missing, f"dvc.yaml stage {name} imports {missing} but does not depend on them"


def test_a_removed_dep_is_caught() -> None:
    """The check is not vacuous: take `measure` out of generate's deps and its timing modules show up as missing."""
    script, deps = stages()["generate"]
    assert "src/headline_bench/measure" in deps
    missing = uncovered(closure(script), [d for d in deps if d != "src/headline_bench/measure"])
    assert "src/headline_bench/measure/runner.py" in missing and "src/headline_bench/measure/trackers.py" in missing


def test_no_stage_imports_another() -> None:
    scripts = {p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_")}  # _workspace: the import path, not a stage
    for path in (ROOT / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            assert not {n for n in names if n and n.split(".")[0] in scripts}, f"{path.name} imports another stage script"


def test_report_does_not_depend_on_serving() -> None:
    """`dvc repro report` must never start a server: nothing of the serving branch is among its deps."""
    body = pipeline_stages()["report"]
    assert not [d for d in body["deps"] if "serving" in d or "served" in d]


def test_score_declares_the_files_of_every_reference_the_schema_allows() -> None:
    """score reads its reference's generations and quality pass (quality/score.py); the schema lets `reference` name only
    techniques whose files every score stage declares, so `dvc status` sees each file a score depends on."""
    from headline_bench.settings import REFERENCES

    deps = pipeline_stages()["score"]["do"]["deps"]
    for name in (*REFERENCES, "${key}"):
        assert f"data/generations/{name}.jsonl" in deps and f"data/quality/{name}.jsonl" in deps, name
