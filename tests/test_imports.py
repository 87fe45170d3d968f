"""The import graph of `parity` (every import: module level, inside functions, under TYPE_CHECKING): no module
imports itself through others, no package circles, no arrow from a lower stage to a higher one, and no private
name (`_x`) imported from another module. Read from the source with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "parity"
# self-contained model code that transformers loads from a model folder, not part of the harness
SKIP = ("fixtures/remote_code", "fixtures/qwen2_remote_code")

# Lower stages never import higher ones (README "Design": inputs -> reference -> deployment -> align -> checks
# -> verdict -> reports). Modules of the top-level package not named here are level 0.
LEVELS: dict[str, int] = {
    "parity.deploy": 1, "parity.reference": 1, "parity.compare": 1, "parity.inputs": 1,
    "parity.disguise": 2, "parity.quant": 2, "parity.checks": 2, "parity.engines": 2, "parity.layerwise": 2,
    "parity.generation": 2, "parity.cases": 2,
    "parity.verdict": 2, "parity.report": 3, "parity.options": 3, "parity.judge": 3,
    "parity.pipeline": 4, "parity.parallel": 4, "parity.faults": 4, "parity.api": 5, "parity.cli": 6,
    "parity.lmdeploy_cli": 6, "parity.pytest_plugin": 6, "parity": 6,
}
# Known debt, each with its reason; the tests fail when one disappears, so the list only shrinks. parity.quant
# holds deployment- and reference-side pieces that belong below it: the int4 workspace reader (it subclasses
# deploy's Workspace, which opens it for an int4 config.yaml), the AWQ folder reader (how the reference loads
# an AWQ checkpoint and the converter recognises one) and the KV-cache quantization the decode replay and the
# reference's decode store with.
KNOWN_MODULE_CYCLES = {frozenset({"parity.deploy.workspace", "parity.quant.workspace"})}
KNOWN_UPWARD = {("parity.deploy.workspace", "parity.quant.workspace"),
                ("parity.deploy.convert", "parity.quant.awq_folder"),
                ("parity.reference.loader", "parity.quant.awq_folder"),
                ("parity.deploy.replay", "parity.quant.kv"),
                ("parity.reference.session", "parity.quant.kv_reference")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent)
        if any(s in str(rel) for s in SKIP):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of module `name`."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:  # `from . import api` imports a module, `from .x import f` a name
                sub = f"{target}.{a.name}"
                out.append((sub, []) if sub in MODULES else (target, [a.name]))
    return [(t, n) for t, n in out if t in MODULES and t != name]


GRAPH = {m: sorted({t for t, _ in _imports(m)}) for m in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(n: str) -> None:
        index[n] = low[n] = len(index)
        stack.append(n)
        for w in graph.get(n, ()):
            if w not in index:
                visit(w)
                low[n] = min(low[n], low[w])
            elif w in stack:
                low[n] = min(low[n], index[w])
        if low[n] == index[n]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == n:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for n in graph:
        if n not in index:
            visit(n)
    return found


def _package(module: str) -> str:
    """The stage a module belongs to: its subpackage, or the module itself at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _level(module: str) -> int:
    return LEVELS.get(_package(module), 0)


def test_graph_sees_lazy_and_type_checking_imports():
    """The graph is not blind to imports inside functions (the ones that hide circles)."""
    assert "parity.deploy.layout" in GRAPH["parity.compare.align"]
    assert "parity.engines" in GRAPH["parity.pipeline"]
    assert "parity.deploy.shapes" in GRAPH["parity.deploy.layout"]  # under TYPE_CHECKING
    assert "parity.api" in GRAPH["parity"]                          # inside __getattr__


def test_no_module_imports_itself_through_others():
    assert set(_cycles(GRAPH)) == KNOWN_MODULE_CYCLES


def test_no_package_circles():
    packages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        for t in targets:
            if _package(m) != _package(t) and (m, t) not in KNOWN_UPWARD:
                packages.setdefault(_package(m), set()).add(_package(t))
    assert _cycles({k: sorted(v) for k, v in packages.items()}) == []


def test_no_upward_arrows():
    upward = {(m, t) for m, targets in GRAPH.items() for t in targets if _level(t) > _level(m)}
    assert upward == KNOWN_UPWARD


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_from_other_modules(module):
    private = [(t, n) for t, names in _imports(module) for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == [], f"{module} imports private names {private}: make them public where they live"
