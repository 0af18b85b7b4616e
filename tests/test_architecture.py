"""The library's floors: imports run one way only, and nothing in invariance/ imports Ray or jobs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parent.parent / "invariance"
# engine -> measures -> analysis | training -> core -> io -> config -> errors; a package may use its
# own modules. measures/: one module per measure, registered; the engine iterates the registry
FLOORS = {"errors": 0, "config": 1, "io": 2, "core": 3, "analysis": 4, "training": 4, "measures": 5, "engine": 6}
SIDE_BY_SIDE = {frozenset({"analysis", "training"})}
FORBIDDEN_ROOTS = {"ray", "jobs"}


def part_of(module: str) -> str | None:
    """``invariance.core.models`` -> ``core``; ``invariance`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "invariance" else None


def module_name(path: Path) -> str:
    relative = path.relative_to(LIBRARY.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions and TYPE_CHECKING included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "invariance":  # from invariance import core -> invariance.core (not __version__)
                found += [(node.lineno, f"invariance.{alias.name}") for alias in node.names if alias.name in FLOORS]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute module")
    return found


def violations(path: Path) -> list[str]:
    own = part_of(module_name(path))
    bad = []
    for line, target in imported_modules(path):
        where = f"{path.relative_to(LIBRARY.parent)}:{line} imports {target}"
        if target.split(".")[0] in FORBIDDEN_ROOTS:
            bad.append(f"{where}: the library never imports Ray or jobs/")
            continue
        other = part_of(target)
        if other is None or own is None or other == own:
            continue
        if other not in FLOORS:
            bad.append(f"{where}: unknown part of the library (add it to the floors)")
        elif frozenset({own, other}) in SIDE_BY_SIDE:
            bad.append(f"{where}: {own}/ and {other}/ stand side by side and never import each other")
        elif FLOORS[other] >= FLOORS[own]:
            bad.append(f"{where}: {own} (floor {FLOORS[own]}) may import only floors below it, not {other} (floor {FLOORS[other]})")
    return bad


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_every_part_of_the_library_has_a_floor() -> None:
    parts = {path.stem if path.parent == LIBRARY else path.relative_to(LIBRARY).parts[0] for path in library_files()}
    assert parts - {"__init__"} == set(FLOORS)


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY.parent)))
def test_imports_run_downward_only(path: Path) -> None:
    assert not violations(path)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    global LIBRARY
    library = tmp_path / "invariance"
    (library / "io").mkdir(parents=True)
    (library / "analysis").mkdir()
    bad = library / "io" / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from invariance.engine.plan import Plan\n    import ray\n")
    side = library / "analysis" / "x.py"
    side.write_text("from invariance.training.run import run_finetune\nfrom invariance.io.storage import Store\n")
    real, LIBRARY = LIBRARY, library
    try:
        found = violations(bad)
        assert len(found) == 2 and "engine" in found[0] and "Ray" in found[1]
        found = violations(side)
        assert len(found) == 1 and "side by side" in found[0]
    finally:
        LIBRARY = real


def test_every_subpackage_says_what_lives_there() -> None:
    for init in sorted(LIBRARY.glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring.splitlines()) == 1, f"{init}: a one-line docstring"


def test_the_engine_names_no_measure() -> None:
    """The engine plans, runs, keys, records, reduces and reports measures through the registry:
    no module of engine/ imports a measure's module, nor names a measure's unit or shard folder."""
    named = re.compile(r"\b(StirUnit|KnnUnit|InversionUnit|PointUnit\(|measures\.(stir|cka|subspace|knn|procrustes|function)\b|"
                       r"[\"'](stir|cka|subspace|knn|procrustes)[\"'])")
    found = []
    for path in sorted((LIBRARY / "engine").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if named.search(line.split("#")[0]):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_builtin_measure_is_one_module_registered_by_name() -> None:
    from invariance.measures import MEASURES

    for name, cls in MEASURES.items():
        assert cls.__module__ == f"invariance.measures.{name}", (name, cls.__module__)
