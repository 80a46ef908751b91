"""The package layout has no import cycles between subpackages: the data path reads one way."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamgen"


def subpackage_imports() -> dict[str, set[str]]:
    """{subpackage: subpackages its modules import}, from relative imports (eager or lazy)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("streamgen", pkg, ...)
        if len(parts) < 3:
            continue  # top-level modules (cli, api, errors, lru, rng) sit above or beside everything
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(parts[:-1])[: len(parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                if len(target) > 1 and target[1] != parts[1]:
                    edges[parts[1]].add(target[1])
    return edges


def test_no_import_cycles_between_subpackages() -> None:
    edges = subpackage_imports()

    def path(a: str, b: str, seen: frozenset = frozenset()) -> list[str] | None:
        for n in sorted(edges.get(a, ())):
            if n == b:
                return [a, b]
            if n not in seen and (rest := path(n, b, seen | {n})):
                return [a, *rest]
        return None

    cycles = [" → ".join(p) for a in sorted(edges) for b in sorted(edges[a]) if (p := path(b, a)) and p[0] == b]
    assert not cycles, cycles
    assert "engine" in edges["bundles"] and "bundles" not in edges["models"]  # the layer the issue asked for
