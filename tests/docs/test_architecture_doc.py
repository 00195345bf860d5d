"""docs/ARCHITECTURE.md matches the code: every path it cites exists, each layer's row lists
exactly that folder's modules, each contract is declared in the module its row cites, and
every code name it puts in backticks is defined in the package. A doc that drifted (issue
33: `MANIFEST_SCHEMA` placed in the module that only uses it) fails here, not in a reader's
search."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
LAYERS = ("core", "storage", "table", "model", "image", "corpus", "job", "demo", "cli")
# Backticked words that are not tagpipe's names: other libraries' calls, column names.
NOT_OURS = {"map_batches", "pa.schema", "decision", "_tagged_i"}
IDENTIFIER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?")


@cache
def defined_in(path: Path) -> frozenset[str]:
    """Top-level names of a module, and Class.member for its classes' methods and fields."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def defined_anywhere() -> set[str]:
    return set().union(*(defined_in(p) for p in (ROOT / "pipeline").rglob("*.py")))


def modules_of(layer: str) -> set[str]:
    return {p.stem for p in (ROOT / "pipeline" / layer).glob("*.py") if not p.stem.startswith("__")}


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def code_names(cell: str) -> list[str]:
    """The backticked names of a text (outside fenced blocks), a call's arguments left off."""
    prose = re.sub(r"```.*?```", "", cell, flags=re.S)
    names = (re.sub(r"\(.*\)$", "", tick) for tick in re.findall(r"`([^`\n]+)`", prose))
    return [name for name in names if IDENTIFIER.fullmatch(name) and not name.endswith(".py")]


def cited_paths(text: str) -> list[str]:
    """Every file the text cites: from the repository root, inside pipeline/ from a layer
    folder (`job/graph.py`), or a bare module name (`inventory.py`), as pipeline/**."""
    found = re.findall(r"\b((?:pipeline|jobs|tests|benchmarks|infra|docs)/[\w/.*-]*\w)", text)
    layer_files = re.findall(rf"(?<![\w/])((?:{'|'.join(LAYERS)})/\w+\.py)\b", text)
    found += [f"pipeline/{path}" for path in layer_files]
    bare = re.findall(r"(?<![\w/.])(\w+\.py)\b", text)
    found += [f"pipeline/**/{name}" for name in bare if name != "__init__.py"]
    return sorted(set(found))


def missing_paths(text: str) -> list[str]:
    return [path for path in cited_paths(text) if not any(ROOT.glob(path))]


def undefined_contracts(text: str) -> list[str]:
    """Contract names not defined in any module their row cites (any module, if none)."""
    wrong = []
    for row in table_rows(text, "| data |"):
        cell = row[-1]
        paths = [ROOT / p for p in cited_paths(cell) if p.endswith(".py") and "*" not in p]
        for name in code_names(cell):
            homes = [p for p in paths if p.exists() and name in defined_in(p)]
            if not homes and (paths or name not in defined_anywhere()):
                wrong.append(f"{name} (cited: {', '.join(str(p.relative_to(ROOT)) for p in paths)})")
    return wrong


def layer_mismatches(text: str) -> list[str]:
    """Per layer row: modules listed that are not in the folder, and those it leaves out."""
    wrong = []
    for row in table_rows(text, "| layer |"):
        layer = row[0].strip("`/")
        listed = {name for name in re.findall(r"`([^`]+)`", row[1]) if IDENTIFIER.fullmatch(name)}
        actual = modules_of(layer)
        if listed != actual:
            wrong.append(
                f"{layer}/: not there {sorted(listed - actual)}, not listed {sorted(actual - listed)}"
            )
    return wrong


def unknown_names(text: str) -> list[str]:
    """Backticked code names that are neither defined in the package nor a module or layer."""
    known = defined_anywhere() | NOT_OURS | set(LAYERS)
    known |= {m for layer in LAYERS for m in modules_of(layer)}
    return sorted({name for name in code_names(text) if name not in known})


def test_every_cited_path_exists():
    assert not missing_paths(DOC.read_text())


def test_each_layer_row_lists_exactly_its_folders_modules():
    assert {row[0].strip("`/") for row in table_rows(DOC.read_text(), "| layer |")} == set(LAYERS)
    assert not layer_mismatches(DOC.read_text())


def test_each_contract_is_declared_where_its_row_says():
    assert not undefined_contracts(DOC.read_text())


def test_every_backticked_name_is_defined():
    assert not unknown_names(DOC.read_text())


def test_drift_is_found():
    """The checks fail on a doc with a moved contract, a missing file, a module left out of
    its layer's row, and a name the package does not define."""
    text = DOC.read_text()
    moved = text.replace("`Snapshot`, pipeline/table/tag_table.py", "`Snapshot`, pipeline/table/labels.py")
    (wrong,) = undefined_contracts(moved)
    assert wrong.startswith("Snapshot (cited: ") and "pipeline/table/labels.py" in wrong
    assert missing_paths(text + "\npipeline/job/gone.py, job/gone_too.py, gone_three.py") == [
        "pipeline/**/gone_three.py",
        "pipeline/job/gone.py",
        "pipeline/job/gone_too.py",
    ]
    assert layer_mismatches(text.replace("`words`, ", "")) == ["core/: not there [], not listed ['words']"]
    assert unknown_names(text + "\n`NoSuchRecord.field`") == ["NoSuchRecord.field"]
