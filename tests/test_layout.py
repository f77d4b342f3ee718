"""The layout keeps its rules (an AST walk of the tree, no import of it):

* no import cycle between modules;
* the packages stack up: ``vswapcommon`` imports none of ours, ``pagewire``
  only ``vswapcommon``, the store (``hoststore``) neither vswapfs nor vswapctl,
  and vswapfs reaches the store's package only from the in-process store
  (``vswapfs.inproc``); the FS-cache (``fscache``) stands on vswapfs's store
  clients, and on the store only through them;
* no function longer than 60 lines, no class longer than 400.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

TOP = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("vswapcommon", "pagewire", "hoststore", "vswapfs", "fscache", "offload", "vswapctl")
MAY_IMPORT = {
    "vswapcommon": set(),
    "pagewire": {"vswapcommon"},
    "hoststore": {"vswapcommon", "pagewire"},
    "vswapfs": {"vswapcommon", "pagewire"},  # and hoststore from vswapfs.inproc only
    "fscache": {"vswapcommon", "pagewire", "vswapfs"},  # the store's package through vswapfs.inproc only
    "offload": {"vswapcommon"},
    "vswapctl": {"vswapcommon", "pagewire", "hoststore", "vswapfs", "fscache", "offload"},
}
IN_PROCESS_STORE = "vswapfs.inproc"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((TOP / package).rglob("*.py")):
            parts = path.relative_to(TOP).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, tree: ast.AST) -> set[str]:
    """The modules of ours ``name`` imports (``from package import module`` names the module)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m.split(".")[0] in PACKAGES and m in MODULES}


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
GRAPH = {name: _imports(name, tree) - {name} for name, tree in TREES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_packages_import_only_what_lies_below_them() -> None:
    wrong = []
    for name, imported in GRAPH.items():
        package = name.split(".")[0]
        for other in imported:
            target = other.split(".")[0]
            if target == package or target in MAY_IMPORT[package]:
                continue
            if package == "vswapfs" and target == "hoststore" and name == IN_PROCESS_STORE:
                continue
            wrong.append(f"{name} -> {other}")
    assert not wrong, wrong


def test_the_check_sees_the_imports_it_polices() -> None:
    """The walk itself: it finds vswapfs.inproc's use of the store, and pagewire's of vswapcommon."""
    assert any(m.startswith("hoststore.") for m in GRAPH[IN_PROCESS_STORE])
    assert any(m.startswith("vswapcommon") for m in GRAPH["pagewire.messages"])


ALL_SOURCES = sorted(p for d in (*PACKAGES, "tests", "tools", "examples") for p in (TOP / d).rglob("*.py"))


@pytest.mark.parametrize("kind,limit", [(ast.ClassDef, MAX_CLASS_LINES), ((ast.FunctionDef, ast.AsyncFunctionDef),
                                                                          MAX_FUNCTION_LINES)])
def test_no_function_or_class_is_too_long(kind: type | tuple[type, ...], limit: int) -> None:
    """Anywhere: the packages, the tests, the tools and the examples."""
    long = [f"{path.relative_to(TOP)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in ALL_SOURCES for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, kind) and node.end_lineno - node.lineno + 1 > limit]
    assert not long, long


def test_every_package_of_the_tree_is_installed() -> None:
    """setup.cfg's package list takes in every package, subpackages too: a `pip install .`
    without ``vswapctl.commands`` would install a vswapctl that cannot start."""
    import configparser

    import setuptools

    cfg = configparser.ConfigParser()
    cfg.read(TOP / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    installed = set(setuptools.find_packages(str(TOP), include=include))
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert "vswapctl.commands" in packages and packages <= installed, packages - installed
