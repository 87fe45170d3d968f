"""The verdict: pass only with zero error findings; the first divergence is the earliest point, in
execution order, whose local error exceeds its threshold, with the cause the checks attributed."""

from __future__ import annotations

from .points import execution_order
from .records import Divergence, Finding


def _order_key(f: Finding, order: dict, cases: list[str]) -> tuple:
    # prefill findings (step None) first, then decode steps in order, each in execution order
    step = -1 if f.step is None else f.step
    return (step, order.get((f.layer, f.module), len(order)), cases.index(f.case) if f.case in cases else -1)


def decide(findings: list[Finding], num_layers: int, cases: list[str]) -> tuple[str, Divergence | None]:
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return "pass", None
    order = {pt: n for n, pt in enumerate(execution_order(num_layers))}
    # where a value first exceeds its floor: prefill points, else decode steps, else any error
    hidden = [f for f in errors if f.check == "hidden"]
    decode = [f for f in errors if f.check == "decode"]
    pool = hidden or decode or errors
    first = min(pool, key=lambda f: _order_key(f, order, cases))
    return "fail", Divergence(layer=first.layer, module=first.module, positions=first.positions,
                              cause=first.cause, case=first.case, message=first.message, step=first.step)


def sort_findings(findings: list[Finding], num_layers: int, cases: list[str]) -> list[Finding]:
    order = {pt: n for n, pt in enumerate(execution_order(num_layers))}
    rank = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: (rank[f.severity], _order_key(f, order, cases)))
