"""The layout rules (README, "Layout"), checked on the source: every ``import`` anywhere in a
module (top level or inside a function) counts.

- packages form layers: a package imports only the packages listed for it in ``ALLOWED``;
  ``common`` imports nothing of ours;
- the job drivers (``fedcbir``) are imported by no other package, and inside ``fedcbir`` only
  the umbrella command (``fedcbir.cli``) imports a job's entry module;
- no two modules import each other, directly or around a longer loop.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: package -> the packages of ours it may import (lowest layer first).
ALLOWED = {
    "common": set(),
    "catalog": {"common"},
    "device_profiles": {"common"},
    "models": {"common", "catalog"},
    "export": {"common", "catalog", "models"},
    "retrieval": {"common", "catalog", "models", "export"},
    "server": {"common", "catalog", "models"},
    "edge_client": {"common", "catalog", "device_profiles", "models", "server"},
    "fedcbir": {"common", "catalog", "device_profiles", "models", "export", "retrieval", "server",
                "edge_client"},
    "benchmarks": {"common", "catalog", "device_profiles", "models", "export", "retrieval", "server",
                   "edge_client", "benchmarks"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ALLOWED:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(filter(None, (ours(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    dep = full if full in mods else ours(base)
                    if dep:
                        deps.add(dep)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def test_every_package_imports_only_the_layers_below_it():
    bad = sorted(f"{m} imports {d}" for m, ds in _graph().items() for d in ds
                 if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not bad, "imports against the layering (README, Layout):\n" + "\n".join(bad)


def test_job_drivers_are_imported_only_by_the_umbrella_command():
    """No package below imports ``fedcbir`` (the layering test); inside it, one job (``demo``,
    ``study``, ``simulate``) never imports another: only ``fedcbir.cli`` sees them all."""
    def job(mod: str) -> str:
        return mod.split(".")[1] if mod.count(".") else ""

    g = _graph()
    bad = sorted(f"{m} imports {d}" for m, ds in g.items() if m.startswith("fedcbir.") and m != "fedcbir.cli"
                 for d in ds if d.startswith("fedcbir.") and job(d) != job(m))
    assert not bad, "a job driver imports another job:\n" + "\n".join(bad)


def test_no_two_modules_import_each_other():
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                loops.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not loops, "modules that import each other (directly or in a loop): " + "; ".join(map(str, loops))


def test_the_checker_sees_real_imports():
    g = _graph()
    assert "common.errors" in g["models.canonical"]  # a top-level import
    assert "server.simulation" in g["fedcbir.simulate"]
    assert g["common.errors"] == set() and all(d.startswith("common") for m in g if m.startswith("common")
                                                for d in g[m])
