"""docs/architecture.md's layer picture is the import graph of controlplane/, kept true here.

The imports are read from the source with ``ast``: every ``import`` statement, including those
under ``if TYPE_CHECKING:`` and inside functions, since those couple modules as much as any.
Checked: every folder and loose module of the tree is in the picture (and nothing else is),
every import points to a lower row (or stays within its box), the module graph has no cycle,
and import-linter (grimp, which runs the contracts in pyproject.toml) sees every import
found here, ``TYPE_CHECKING`` ones included.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "controlplane"
DOC = ROOT / "docs" / "architecture.md"
MARKER = "<!-- layers (top to bottom), checked by tests/unit/test_architecture.py -->"
GENERATED = "gen/"  # protoc's output: its imports are not ours to arrange


# --- the picture ------------------------------------------------------------------------------


@cache
def layers() -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Rows of the picture, top first; each row's boxes; each box's paths (``a + b``)."""
    text = DOC.read_text()
    assert MARKER in text, f"{DOC}: the layer picture's marker is missing"
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    rows = []
    for line in block.splitlines():
        line = line.strip()
        if not line or line == "▼":
            continue
        boxes = tuple(
            tuple(path.strip() for path in box.split(" + "))
            for box in re.split(r"\s{2,}", line)
        )
        rows.append(boxes)
    return tuple(rows)


def _matches(pattern: str, path: str) -> bool:
    """Whether a picture entry names a module path (``compile/inputs/store.py``)."""
    if pattern.endswith("/"):
        return fnmatch.fnmatch(path, pattern + "*")
    return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*")


def _specificity(pattern: str) -> tuple[int, int]:
    return (pattern.count("/"), len(pattern.replace("*", "")))


def place(path: str) -> tuple[int, int] | None:
    """(row, box) of the most specific entry naming ``path``; row 0 is the top."""
    best: tuple[tuple[int, int], tuple[int, int]] | None = None
    for r, row in enumerate(layers()):
        for b, box in enumerate(row):
            for pattern in box:
                if _matches(pattern, path) and (
                    best is None or _specificity(pattern) > best[0]
                ):
                    best = (_specificity(pattern), (r, b))
    return best[1] if best is not None else None


# --- the code ---------------------------------------------------------------------------------


@cache
def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def relative(module: str) -> str:
    """``controlplane.compile.inputs.store`` → ``compile/inputs/store.py`` (a package: its
    folder, ``compile/inputs/``)."""
    path = modules()[module]
    rel = path.relative_to(PACKAGE).as_posix()
    return rel[: -len("__init__.py")] if path.name == "__init__.py" else rel


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        base = module.split(".")
        if modules()[module].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    for alias in node.names:
        candidate = f"{name}.{alias.name}"
        yield candidate if candidate in modules() else name


@cache
def imports() -> frozenset[tuple[str, str]]:
    """(importer, imported) for every import statement of ours, wherever it stands."""
    edges = set()
    for module, path in modules().items():
        if relative(module).startswith(GENERATED):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(module, node):
                while target not in modules() and "." in target:
                    target = target.rsplit(".", 1)[0]  # a name defined in a module
                if target in modules() and target != module and target != "controlplane":
                    edges.add((module, target))
    return frozenset(edges)


# --- the checks -------------------------------------------------------------------------------


def test_the_picture_names_every_folder_and_loose_module() -> None:
    tops = {
        p.name + "/" if p.is_dir() else p.name
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.name != "__init__.py")
    }
    pictured = [path for row in layers() for box in row for path in box]
    named_tops = {path.split("/", 1)[0] + ("/" if "/" in path else "") for path in pictured}
    assert named_tops == tops, (
        f"in the tree, not in {DOC.name}: {sorted(tops - named_tops)}; "
        f"in {DOC.name}, not in the tree: {sorted(named_tops - tops)}"
    )
    paths = [relative(m) for m in modules() if m != "controlplane"]
    unmatched = [p for p in pictured if not any(_matches(p, path) for path in paths)]
    assert not unmatched, f"{DOC.name} names what the tree does not have: {unmatched}"
    assert len(pictured) == len(set(pictured)), "a path is in the picture twice"
    unplaced = sorted(p for p in paths if place(p) is None)
    assert not unplaced, f"modules in no box of the picture: {unplaced}"


def test_imports_point_down_the_picture() -> None:
    upward = []
    for importer, imported in sorted(imports()):
        here, there = place(relative(importer)), place(relative(imported))
        assert here is not None and there is not None
        if here == there:
            continue  # within one box
        if there[0] <= here[0]:
            upward.append(f"{importer} → {imported}")
    assert not upward, (
        f"imports that do not point down {DOC.name}'s picture (move the code, or the box, "
        "and say why in the picture):\n" + "\n".join(upward)
    )


def _cycles(edges: frozenset[tuple[str, str]]) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_module_graph_has_no_cycle() -> None:
    assert _cycles(imports()) == []


def test_the_cycle_check_can_fail() -> None:
    """A cycle hidden behind TYPE_CHECKING counts as one."""
    edges = frozenset({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")})
    assert _cycles(edges) == [["a", "b", "c"]]


def test_import_linter_sees_every_import_including_type_checking_ones() -> None:
    graph = grimp.build_graph("controlplane", exclude_type_checking_imports=False)
    missing = sorted(
        f"{a} → {b}" for a, b in imports() if not graph.direct_import_exists(
            importer=a, imported=b
        )
    )
    assert not missing, "import-linter does not see:\n" + "\n".join(missing)


def test_type_checking_imports_are_among_those_checked() -> None:
    """The page names the extraction monitor's type only under TYPE_CHECKING."""
    assert ("controlplane.app.page", "controlplane.extraction.monitor") in imports()


@pytest.mark.parametrize(
    ("path", "row"),
    [("app/server.py", "app/"), ("compile/inputs/store.py", "compile/inputs/"),
     ("compile/__init__.py", "compile/")],
)
def test_the_most_specific_entry_places_a_module(path: str, row: str) -> None:
    placed = place(path)
    assert placed is not None
    assert row in layers()[placed[0]][placed[1]]


def test_no_module_imports_another_modules_private_names() -> None:
    """A module's ``_names`` are its own: another module that needs one gets a public name."""
    found = []
    for module, path in modules().items():
        if relative(module).startswith(GENERATED):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "controlplane"
            ):
                found += [
                    f"{module}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert found == []


def _takes_the_control_plane(tree: ast.AST) -> list[str]:
    """Parameters that hand a function the whole control plane: annotated ``ControlPlane``
    (or ``"ControlPlane"``), or named ``plane``/``control_plane`` with no type or ``Any``,
    which hides the dependency from every import check. A ``plane`` typed as a narrow view
    (telemetry's ``Observed``) is fine: the type says which parts are read."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            untyped = annotation in ("", "Any", "typing.Any", "'Any'", "object")
            if "ControlPlane" in annotation or (
                arg.arg in ("plane", "control_plane") and untyped
            ):
                name = getattr(node, "name", "<lambda>")
                found.append(f"{name}({arg.arg}: {annotation or '?'}) line {node.lineno}")
    return sorted(found)


def test_only_the_entry_points_are_handed_the_control_plane() -> None:
    """Services, sources and trackers receive the parts they read (store, inventory, cache,
    sync status, ...), never the ControlPlane object: only controlplane/app/ wires it."""
    found = []
    for module, path in modules().items():
        rel = relative(module)
        if rel.startswith(("app/", GENERATED)):
            continue
        found += [f"{rel}: {hit}" for hit in _takes_the_control_plane(ast.parse(path.read_text()))]
    assert found == []


def test_the_control_plane_check_can_fail() -> None:
    tree = ast.parse(
        "class T:\n"
        "    def __init__(self, plane: Any) -> None: ...\n"
        "def f(cp: 'ControlPlane') -> None: ...\n"
        "def g(store: PolicyStore) -> None: ...\n"
        "def h(plane: Observed) -> None: ...\n"
    )
    assert _takes_the_control_plane(tree) == [
        "__init__(plane: Any) line 2", "f(cp: 'ControlPlane') line 3"
    ]


# Reads of a private attribute of an object other than ``self``/``cls`` that are not across
# modules: the class is defined in the same module, or it is a library's documented spelling.
PRIVATE_READS_ALLOWED = {
    "xds/snapshot.py": {"_by_type", "_type_versions", "_referenced", "_of"},  # Snapshot's own
    "local/model.py": {"_count_lock"},  # ModelServer, read by its handler in the same module
    # argparse has no public query for these
    "app/cliutil.py": {"_option_string_actions", "_actions", "_SubParsersAction"},
    "app/adminauth.py": {"_replace"},  # NamedTuple's public API
}


def _private_reads(tree: ast.AST) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    }


def test_no_module_reads_another_objects_private_attributes() -> None:
    """``x._name`` on an object other than ``self``/``cls`` is another module's internals
    (instrument.py once read the server's ``_xds_server``): it gets a public name instead."""
    found = {}
    for module, path in modules().items():
        rel = relative(module)
        if rel.startswith(GENERATED):
            continue
        reads = _private_reads(ast.parse(path.read_text())) - PRIVATE_READS_ALLOWED.get(rel, set())
        if reads:
            found[rel] = sorted(reads)
    assert found == {}


def test_the_private_read_check_can_fail() -> None:
    tree = ast.parse("self._mine\ncls._ours\nself.api_keys._lock\nplane._xds_server.port\n")
    assert _private_reads(tree) == {"_lock", "_xds_server"}
