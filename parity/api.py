"""The Python API users put in CI:

    from parity import run, assert_parity
    report = run("models/my-xcomposer2", trust_remote_code=True, out="reports/ci")
    assert_parity(report)   # AssertionError naming layer, module, positions and cause
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ParityInputError
from .records import FaultHooks, Report
from .scratch import out_lock, run_scratch


class ParityAssertionError(AssertionError):
    pass


def assert_parity(report: Report, top: int = 5) -> None:
    """Fail with the first divergence, the top error findings and the report's path, in plain words."""
    __tracebackhide__ = True  # pytest shows the user's line, not this helper's frame
    if report.status == "pass":
        return
    from .report import render_failure_message

    raise ParityAssertionError(render_failure_message(report, top=top))


def _check_option_names(options: dict[str, Any]) -> None:
    """A misspelt option is bad input naming the valid ones, not a TypeError from a dataclass."""
    import difflib
    from dataclasses import fields

    from .options import RunOptions

    valid = sorted({f.name for f in fields(RunOptions) if f.name != "model"} | {"out", "jobs", "faults"})
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParityInputError(f"parity.run: unknown option {unknown[0]!r}{hint}; valid options: {', '.join(valid)}.")


def run(model: str | Path, *, out: str | Path | None = None, jobs: int = 1, faults: FaultHooks | None = None,
        **options: Any) -> Report:
    """Run parity from Python; options are `RunOptions` fields (workspace, inputs, numeric, device, ...).
    `faults` injects a fault between stages (`records.FaultHooks`: the fault catalogue's and tests' hooks).

    `jobs` > 1 spreads the cases over that many worker processes (`parity.parallel`; clamped to the number
    of cases) and returns the same report as one process would, timings apart. Workers are spawned, so a
    script calling this at its top level needs the usual `if __name__ == "__main__":` guard.
    Its temporary folders live under one temp root removed when it returns or raises, and `out` is locked
    for the run (`parity.scratch`): a second run into the same `out` is refused.
    """
    import contextlib

    from .parallel import run_parallel
    from .options import RunOptions
    from .report import write_reports

    _check_option_names(options)
    for key in ("workspace", "inputs", "cache_dir", "keep_traces"):
        if isinstance(options.get(key), str):
            options[key] = Path(options[key])
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_scratch())
        if out is not None:
            stack.enter_context(out_lock(out))
        report = run_parallel(RunOptions(model=Path(model), **options), jobs, faults)
        if out is not None:
            write_reports(report, Path(out))
    return report
