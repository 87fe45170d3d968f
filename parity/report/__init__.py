"""The report sink: one Report in, report.json + report.html (+ a terminal summary) out.

    from parity.report import write_reports, render_failure_message
    paths = write_reports(report, "reports/run1")        # {"json": Path, "html": Path}
    assert report, render_failure_message(report)         # what a pytest assertion shows

- `write_reports(report, out_dir)`: creates `out_dir`, writes `report.json` and `report.html` atomically
  (temporary file in the same folder + os.replace). An unwritable folder raises ParityInputError naming it.
- `render_failure_message(report, top=5)`: plain text, the first divergence then one line per top root cause
  (with how many related findings it explains; `report.groups`).
- `parity.report.json_report`: `write_json`, `read_json` (non-finite floats stored as "nan"/"inf"/"-inf").
- `parity.report.html_report`: `write_html`, `render_html` (one self-contained file, plotly.js inlined gzip+base64).
- `parity.report.terminal`: `print_summary(report, console=None, paths=None)`.
"""

from __future__ import annotations

import os
from pathlib import Path

from parity.records import Report
from parity.report._common import (
    POSITION_WORDS,
    divergence_sentence,
    ensure_dir,
    finding_groups,
    related_words,
    status_word,
)
from parity.report.html_report import render_html, write_html
from parity.report.json_report import read_json, write_json
from parity.report.terminal import print_summary

__all__ = [
    "write_reports",
    "render_failure_message",
    "write_json",
    "read_json",
    "write_html",
    "render_html",
    "print_summary",
    "divergence_sentence",
]

JSON_NAME = "report.json"
HTML_NAME = "report.html"


def write_reports(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json and report.html into `out_dir` (created if needed); returns {"json", "html"} paths.

    JSON is written first, so a crash while rendering the page still leaves the machine-readable report.
    """
    folder = ensure_dir(out_dir)
    paths = {"json": folder / JSON_NAME, "html": folder / HTML_NAME}
    write_json(report, paths["json"])
    write_html(report, paths["html"])
    report.written_to = str(folder.resolve())
    return paths


def render_failure_message(report: Report, top: int = 5) -> str:
    """The text a failing pytest assertion shows: the verdict, the first divergence, then the top root causes
    (one line each: [case] layer/module/rows, cause, message; then how many findings it explains)."""
    groups = finding_groups(report)
    n_err = sum(1 for f in report.findings if f.severity == "error")
    n_warn = sum(1 for f in report.findings if f.severity == "warning")
    head = f"parity {status_word(report.status)} for {report.model}: {n_err} error(s), {n_warn} warning(s)"
    if len(groups) < n_err:
        head += f"; {len(groups)} root cause(s)"
    lines = [head]
    if report.first_divergence is not None or groups or report.status != "pass":
        lines.append(f"first divergence: {divergence_sentence(report)}")
    shown = groups[: max(0, top)]
    for f, related in shown:
        where = []
        if f.case and len(report.cases) > 1:
            where.append(f"case {f.case}")
        if getattr(f, "step", None) is not None:
            where.append(f"decode step {f.step}")
        if f.layer is not None:
            where.append(f"layer {f.layer}")
        if f.module:
            where.append(f.module)
        if f.positions:
            where.append(POSITION_WORDS.get(str(f.positions), str(f.positions)))
        msg = " ".join(str(f.message).split())  # one line
        tail = f" [+{related_words(related)}]" if related else ""
        lines.append(f"  - [{f.cause}] {', '.join(where) or 'global'}: {msg}{tail}")
    if len(groups) > len(shown):
        rest = sum(1 + len(r) for _, r in groups[len(shown):])
        lines.append(f"  … {len(groups) - len(shown)} more root cause(s) ({rest} error(s)) in the report")
    if report.written_to:
        lines.append(f"report: {Path(report.written_to) / HTML_NAME} (and {JSON_NAME} beside it)")
    else:
        lines.append("report: not written (pass out=FOLDER to parity.run, or use the parity_run fixture)")
    return "\n".join(lines)
