"""The Python API users put in CI:

    from parity import run, assert_parity
    report = run("models/my-xcomposer2", trust_remote_code=True, out="reports/ci")
    assert_parity(report)   # AssertionError naming layer, module, positions and cause
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import Report


class ParityAssertionError(AssertionError):
    pass


def assert_parity(report: Report, top: int = 5) -> None:
    """Fail with the first divergence and the top error findings, in plain words."""
    if report.status == "pass":
        return
    from .report import render_failure_message

    raise ParityAssertionError(render_failure_message(report, top=top))


def run(model: str | Path, *, out: str | Path | None = None, jobs: int = 1, **options: Any) -> Report:
    """Run parity from Python; options are `RunOptions` fields (workspace, inputs, numeric, device, ...).

    `jobs` > 1 spreads the cases over that many worker processes (`parity.parallel`; clamped to the number
    of cases) and returns the same report as one process would, timings apart. Workers are spawned, so a
    script calling this at its top level needs the usual `if __name__ == "__main__":` guard.
    """
    from .parallel import run_parallel
    from .pipeline import RunOptions
    from .report import write_reports

    for key in ("workspace", "inputs", "cache_dir", "keep_traces"):
        if isinstance(options.get(key), str):
            options[key] = Path(options[key])
    report = run_parallel(RunOptions(model=Path(model), **options), jobs)
    if out is not None:
        write_reports(report, Path(out))
    return report
