"""The house rules of docs/architecture.md, read from the code: no import circle (function-level imports
included), one-way layers, the strategies' registry imported by nothing inside its package, no module over 600
lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "vipalloc"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Our modules that ``name`` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import sub" imports the module pkg.sub when it is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle() -> None:
    """The cycle finder itself: a planted two-module loop is reported."""
    GRAPH["vipalloc.variance"].add("vipalloc.allocation")  # allocation imports variance: now a loop
    try:
        assert ["vipalloc.allocation", "vipalloc.variance"] in _cycles()
    finally:
        GRAPH["vipalloc.variance"].discard("vipalloc.allocation")


def test_no_import_circle() -> None:
    assert _cycles() == []


def test_strategy_registry_is_imported_by_nothing_inside_its_package() -> None:
    inside = [m for m in MODULES if m.startswith("vipalloc.strategies.")]
    assert inside, "the strategies package is missing"
    assert [m for m in inside if "vipalloc.strategies" in GRAPH[m]] == []


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("vipalloc.training", "vipalloc.bench"),  # bench may import training, never the reverse
        ("vipalloc.integrations", "vipalloc.training"),  # plug-ins never import the CPU trainer
        ("vipalloc.strategies", "vipalloc.allocator"),  # the maths does not know its facade
        ("vipalloc.predictors", "vipalloc.allocator"),
    ],
)
def test_layers_point_one_way(importer: str, forbidden: str) -> None:
    bad = sorted(
        (m, t)
        for m, targets in GRAPH.items()
        if m == importer or m.startswith(importer + ".")
        for t in targets
        if t == forbidden or t.startswith(forbidden + ".")
    )
    assert bad == []


def test_old_strategy_imports_keep_working() -> None:
    from vipalloc.strategies import STRATEGY_NAMES, TWO_PHASE_STRATEGIES, get_strategy

    assert set(TWO_PHASE_STRATEGIES) < set(STRATEGY_NAMES)
    assert all(get_strategy(n).name == n for n in STRATEGY_NAMES)


def test_training_config_lists_every_strategy() -> None:
    from vipalloc.strategies import STRATEGY_NAMES
    from vipalloc.training.config import STRATEGIES

    assert STRATEGIES == (*STRATEGY_NAMES, "dapo")


def test_no_module_over_600_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
