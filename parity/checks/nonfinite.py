"""Non-finite values are findings, never crashes: the first point (per case) where the engine has NaN/inf
that the reference does not is an error; NaN/inf in the reference itself is a warning."""

from __future__ import annotations

from ..records import Finding
from .base import CheckContext, CheckOutput


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    seen_eng: set[str] = set()
    seen_ref: set[str] = set()
    for p in ctx.points:
        m = p.e2e
        where = f"layer {p.layer}, {p.module}" if p.layer is not None else p.module
        if m.get("nonfinite_eng", 0) > m.get("nonfinite_ref", 0) and p.case not in seen_eng:
            seen_eng.add(p.case)
            bad = [c for c, cm in m.get("by_class", {}).items() if cm.get("nonfinite_eng", 0)]
            pos = "all" if len(bad) != 1 else ("image" if bad[0] == "image" else "text")
            out.findings.append(Finding(
                check="nonfinite", severity="error", cause="nonfinite", layer=p.layer, module=p.module,
                positions=pos, case=p.case,
                message=(f"{where}: the engine produced {m['nonfinite_eng']} non-finite value(s) where the reference "
                         f"has {m['nonfinite_ref']} (first appearance in execution order; rows in {', '.join(bad)})."),
                metrics={"nonfinite_eng": m["nonfinite_eng"], "nonfinite_ref": m["nonfinite_ref"]}))
        if m.get("nonfinite_ref", 0) and p.case not in seen_ref:
            seen_ref.add(p.case)
            out.findings.append(Finding(
                check="nonfinite", severity="warning", cause="nonfinite", layer=p.layer, module=p.module,
                positions="all", case=p.case,
                message=f"{where}: the reference itself has {m['nonfinite_ref']} non-finite value(s)."))
    return out
