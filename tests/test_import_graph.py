"""The import graph of the product, lazy imports included: no circles, one way along the pipeline.

Packages are ranked along the pipeline (``PIPELINE``); a module may import its own package and
packages of a lower or equal rank, never a higher one, and never another package's private
(``_name``) attributes. Imports inside functions count the same as top-level ones: a circle hidden
by a lazy import is still a circle. Each rule has a negative control on a small made-up graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder → import name (pyproject's package-dir: plugins/ and export/ import as m3_trt.plugins / m3_trt.export)
FOLDERS = {"m3_trt": "m3_trt", "export": "m3_trt.export", "plugins": "m3_trt.plugins"}
# the pipeline, bottom to top; equal ranks may not import each other either (checked as a circle only)
PIPELINE = {
    "m3_trt": 0,  # root modules: outputs, tolerances
    "plugins": 0,
    "model": 1,
    "processing": 1,
    "quant": 2,
    "checkpoints": 3,
    "export": 4,
    "build": 5,
    "runtime": 6,
    "serving": 7,
    "compare": 8,
    "cli": 9,
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in FOLDERS.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            parts = list(p.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = p
    return out


def import_edges(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """module → {(imported module, imported attribute or '')}, every import statement in the file."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[tuple[str, str]]] = {}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {(resolve(a.name), "") for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found.add((sub, "") if sub in mods else (resolve(base), a.name))
        edges[m] = {(t, attr) for t, attr in found if t and t != m}
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def package_of(module: str) -> str:
    """``m3_trt.build.plan`` → ``build``; a root module (``m3_trt.outputs``) → ``m3_trt``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "m3_trt"
    return parts[1] if parts[1] in PIPELINE else "m3_trt"


def violations(edges: dict[str, set[tuple[str, str]]]) -> list[str]:
    bad = []
    for m, targets in edges.items():
        a = package_of(m)
        for t, attr in targets:
            b = package_of(t)
            if a != b and PIPELINE[b] > PIPELINE[a]:
                bad.append(f"{m} imports {t} ({b} is above {a} in the pipeline)")
            if a != b and attr.startswith("_"):
                bad.append(f"{m} imports the private {t}.{attr}")
    return sorted(bad)


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    assert len(mods) > 80, sorted(mods)  # the walk found the product, not an empty folder
    return import_edges(mods)


def test_no_import_circles(graph):
    assert cycles({m: {t for t, _ in ts} for m, ts in graph.items()}) == []


def test_imports_go_one_way_along_the_pipeline(graph):
    assert violations(graph) == []


def test_every_package_is_ranked():
    packages = {p.parent.name for p in (ROOT / "m3_trt").glob("*/__init__.py")}
    assert packages - set(PIPELINE) == set()


def test_checks_catch_what_they_are_for():
    """Negative controls: a circle through a lazy import, an upward import and a private name are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    bad = violations({"m3_trt.model.modeling": {("m3_trt.serving.client", "")},
                      "m3_trt.cli.main": {("m3_trt.build.builder", "_build")},
                      "m3_trt.build.plan": {("m3_trt.build.targets", "_coerce")}})
    assert bad == ["m3_trt.cli.main imports the private m3_trt.build.builder._build",
                   "m3_trt.model.modeling imports m3_trt.serving.client (serving is above model in the pipeline)"]
    # the real parser sees an import inside a function
    src = ROOT / "m3_trt" / "build" / "builder.py"
    lazy = [n for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.ImportFrom)
            and n.col_offset > 0]
    assert lazy, "builder.py has lazy imports; the walk must include them"
