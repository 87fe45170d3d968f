"""`parity/pipeline.py` reads as the stages in order and holds no engine-specific branch: what differs
between engines is stated by the engine (`EngineSettings`) or set up beside it (`options.engine_setup`), never
decided in the pipeline. Read from the source with `ast`; nothing is run."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from parity.engines import ENGINES

PIPELINE = Path(__file__).resolve().parents[1] / "parity" / "pipeline.py"
MAX_LINES = 90  # the stages in order fit in about 60-80 lines; a little room for one-line edits

# What differs between engines or deployments: the run options and engine settings that say so, the engine
# object itself, the engines' names and classes. The pipeline passes them on; it never branches on them.
ENGINE_SPECIFIC = frozenset({"engine", "kind", "live", "quant_policy", "kv_bits", "layers", "serve_from", "numeric",
                             "teacher_forced", "floor_dtype", "weight_type", "kv_cache"}
                            | set(ENGINES) | {target.split(":")[1] for target in ENGINES.values()})
# Options that are per-engine setup (`options.engine_setup`): the pipeline does not even read them.
SETUP_ONLY = frozenset({"live", "quant_policy"})


def _words(node: ast.AST) -> set[str]:
    """Every name, attribute and string constant in an expression."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
    return out


def engine_branches(source: str) -> list[str]:
    """Where `source` decides something on what differs between engines: a condition (if, while, ternary,
    comprehension filter, assert, match) or a comparison anywhere that mentions it, or a read of a setup-only
    option. Each as 'line N: <code>'."""
    tree = ast.parse(source)
    tests: list[ast.AST] = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(n.test)
        elif isinstance(n, ast.comprehension):
            tests += n.ifs
        elif isinstance(n, ast.Match):
            tests.append(n.subject)
            tests += [c.guard for c in n.cases if c.guard is not None]
        elif isinstance(n, ast.Compare):
            tests.append(n)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "hasattr",
                                                                                        "getattr", "type"):
            tests.append(n)
    found = [t for t in tests if _words(t) & ENGINE_SPECIFIC]
    found += [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in SETUP_ONLY]
    return sorted({f"line {t.lineno}: {ast.unparse(t)}" for t in found})


def test_pipeline_holds_no_engine_specific_branch():
    found = engine_branches(PIPELINE.read_text())
    assert found == [], ("parity/pipeline.py decides on what differs between engines; state it in the engine's "
                         "EngineSettings or set it up in options.engine_setup:\n" + "\n".join(found))


def test_pipeline_reads_as_the_stages_in_order():
    lines = len(PIPELINE.read_text().splitlines())
    assert lines <= MAX_LINES, (f"parity/pipeline.py has {lines} lines (at most {MAX_LINES}): move the stage's body to "
                                "the stage that owns it (docs/architecture.md)")


@pytest.mark.parametrize("snippet", [
    # the shapes pipeline.py once had (the quantized KV cache set up inline, live options read)
    """
    if opts.quant_policy:
        session.kv_cache = turbomind_kv(bits_for_policy(opts.quant_policy), ws.dtype)
    """,
    "options = dict(opts.live)",
    "if opts.engine == 'turbomind':\n    run_layers()",
    "floor = torch.float64 if settings.numeric == 'fp32' else ws.dtype",
    "if isinstance(engine, LiveRunner):\n    pass",
    "if hasattr(engine, 'decode') and opts.decode:\n    pass",
    "while settings.teacher_forced:\n    break",
    "names = [c for c in cases if c.kind != 'replay']",
])
def test_the_guard_sees_an_engine_branch(snippet):
    assert engine_branches(textwrap.dedent(snippet)), snippet


def test_the_guard_leaves_plain_stage_logic_alone():
    plain = """
    if opts.decode and case.same_rows and deployed[-1].run is not None:
        pass
    if opts.session is None:
        session.close()
    engine = engine_class(opts.engine)(engine_setup(opts, semantics, session, ws, faults))
    """
    assert engine_branches(textwrap.dedent(plain)) == []
