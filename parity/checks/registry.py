"""The checks, in the order they run. A check is `run(ctx) -> CheckOutput`; the hidden-state check runs last
and reads every finding before it (to attribute each exceeded point to its most specific cause). A new check
goes into `CHECKS`, with a test that injects the fault it catches."""

from __future__ import annotations

from typing import Callable, Iterable

from ..records import EngineWarning, Finding
from . import config, hidden, inputs, mask, nonfinite, plora, source, weights
from .base import CheckContext, CheckOutput

CHECKS: tuple[tuple[str, Callable[[CheckContext], CheckOutput]], ...] = (
    ("inputs", inputs.run),
    ("source", source.run),
    ("config", config.run),
    ("weights", weights.run),
    ("mask", mask.run),
    ("plora", plora.run),
    ("nonfinite", nonfinite.run),
)


def run_checks(ctx: CheckContext, prior: list[Finding]) -> tuple[dict[str, CheckOutput], list[Finding]]:
    """Every check's output by name, and `prior` followed by all their findings (the hidden check's last)."""
    outputs: dict[str, CheckOutput] = {}
    findings = list(prior)
    for name, run in CHECKS:
        outputs[name] = run(ctx)
        findings += outputs[name].findings
    outputs["hidden"] = hidden.run(ctx, findings)
    return outputs, findings + outputs["hidden"].findings


def warning_findings(warnings: Iterable[EngineWarning]) -> list[Finding]:
    """What the deployment side noticed about itself (conversion, loading), as warnings of the report."""
    return [Finding(check=w.check, severity="warning", cause=w.cause, message=w.message) for w in warnings]


def refused_finding(e: Exception, case: str) -> Finding:
    """The engine refused the workspace at load time (`errors.EngineRefused`): an error of that case."""
    return Finding(check="engine", severity="error", cause="shape_mismatch", case=case,
                   message=f"The engine refused to load the workspace, as TurboMind would at start-up: {e}")
