"""The folders under pipeline/ are the layers (docs/ARCHITECTURE.md), and that is checked.

`lint-imports` reads the contracts in pyproject.toml: each layer imports only the layers
below it, and no folder's modules import each other in a cycle. The checks are shown
to fail on a copy of the package with one upward import, and with one cycle.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
LONG_MODULE_LINES = 400
LONG_MODULE_REASON = "Why this module is long:"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def test_layers_and_no_cycles_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_an_upward_import_breaks_the_layers(tmp_path):
    root = _copy(tmp_path)
    _append(root / "pipeline/storage/filesystem.py", "from pipeline.table import tag_table  # noqa")
    result = _lint(root)
    assert result.returncode == 1
    assert "Each layer imports only the layers below it BROKEN" in result.stdout
    assert "pipeline.storage.filesystem -> pipeline.table.tag_table" in result.stdout


def test_a_cycle_inside_a_folder_is_found(tmp_path):
    root = _copy(tmp_path)
    # rethreshold -> incremental already; the reverse closes a cycle inside pipeline/job
    _append(
        root / "pipeline/job/incremental.py", "def _late():\n    from pipeline.job import rethreshold  # noqa"
    )
    result = _lint(root)
    assert result.returncode == 1
    assert "No import cycle among the modules of any folder BROKEN" in result.stdout


def _modules() -> list[Path]:
    return sorted((ROOT / "pipeline").rglob("*.py"))


def test_no_module_shadows_the_standard_library():
    """`pipeline/inspect.py` once shadowed `inspect` when pipeline/ was on sys.path."""
    shadowing = [str(p.relative_to(ROOT)) for p in _modules() if p.stem in sys.stdlib_module_names]
    shadowing += [
        str(p.relative_to(ROOT))
        for p in (ROOT / "pipeline").iterdir()
        if p.is_dir() and p.name in sys.stdlib_module_names
    ]
    assert not shadowing


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_modules_say_why(path):
    lines = len(path.read_text().splitlines())
    if lines <= LONG_MODULE_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert LONG_MODULE_REASON in docstring, f"{lines} lines and no '{LONG_MODULE_REASON}' in its docstring"


def _packages() -> list[Path]:
    return sorted(p for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())


def unnamed_modules(package: Path) -> list[str]:
    """The modules of `package` (not __init__ or __main__) whose name its docstring lacks
    as a word: a folder's docstring is its map, and a module it leaves out is one a reader
    does not find."""
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("__"))
    return [name for name in modules if not re.search(rf"\b{name}\b", docstring)]


@pytest.mark.parametrize("package", _packages(), ids=lambda p: p.name)
def test_every_folder_says_what_it_is_and_names_each_module(package):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert docstring and len(docstring) > 100, package.name
    assert not unnamed_modules(package), f"pipeline/{package.name}/__init__.py does not name these modules"


def test_a_module_the_docstring_leaves_out_is_found(tmp_path):
    package = tmp_path / "layer"
    package.mkdir()
    (package / "__init__.py").write_text('"""The layer: reading (readers), and a reader_extra."""\n')
    for name in ("reading", "reader", "reader_extra", "__main__"):
        (package / f"{name}.py").write_text("")
    assert unnamed_modules(package) == ["reader"]
