"""A short rich summary for the terminal: verdict, first divergence, the top error findings, report paths.

Example::

    from parity.report.terminal import print_summary
    print_summary(report, paths={"html": "reports/run1/report.html", "json": "reports/run1/report.json"})
"""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from parity.records import Report
from parity.report._common import POSITION_WORDS, divergence_sentence, finding_groups, related_words, status_word

__all__ = ["print_summary"]

_STYLE = {"pass": "bold white on green", "fail": "bold white on red", "error": "bold black on yellow"}
TOP = 8


def print_summary(report: Report, console: Console | None = None,
                  paths: Mapping[str, object] | None = None) -> None:
    """Print the verdict line, the first divergence, up to 8 root causes (each with how many findings it
    explains), and the report paths."""
    console = console or Console()
    status = str(report.status).lower()
    groups = finding_groups(report)
    errors = [f for f, _ in groups]
    n_err = sum(1 for f in report.findings if f.severity == "error")
    warnings = [f for f in report.findings if f.severity == "warning"]

    line = Text()
    line.append(f" {status_word(status)} ", style=_STYLE.get(status, "bold"))
    line.append(f"  {report.model}", style="bold")
    engine = report.engine or {}
    bits = [str(engine.get(k)) for k in ("kind", "lmdeploy_version", "numeric") if engine.get(k) is not None]
    if bits:
        line.append("  (" + ", ".join(bits) + ")", style="dim")
    roots = f" ({len(groups)} root cause(s))" if len(groups) < n_err else ""
    line.append(f"  {n_err} error(s){roots}, {len(warnings)} warning(s), "
                f"{sum(1 for p in report.points if p.exceeded)}/{len(report.points)} points over threshold",
                style="dim")
    console.print(line)

    if status != "pass" or report.first_divergence is not None:
        label = "First divergence: " if report.first_divergence is not None else "First error: "
        sent = Text(label, style="bold")
        sent.append(divergence_sentence(report))
        console.print(sent)

    for d in getattr(report, "decode", []) or []:  # --decode N: one line per case
        tail = ("every token matches" if d.first_divergent_step is None else
                f"first divergent token at step {d.first_divergent_step}")
        console.print(Text(f"Decode {d.case}: {d.steps_run}/{d.requested} tokens, {tail}, "
                           f"{sum(1 for p in d.points if p['exceeded'])} step point(s) over threshold", style="dim"))

    if errors:
        many = len({f.case for f in errors if f.case}) > 1
        if console.width >= 120:
            table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, show_edge=False)
            table.add_column("cause", style="red", no_wrap=True)
            if many:
                table.add_column("case", no_wrap=True)
            table.add_column("layer", justify="right", no_wrap=True)
            table.add_column("module", no_wrap=True)
            table.add_column("rows", no_wrap=True)
            table.add_column("message", overflow="fold", min_width=30)
            table.add_column("explains", style="dim", overflow="fold", max_width=40)
            for f, related in groups[:TOP]:
                row = [Text(f.cause)]
                if many:
                    row.append(Text(f.case or ""))
                row += [Text("—" if f.layer is None else str(f.layer)), Text(f.module or "—"),
                        Text(POSITION_WORDS.get(str(f.positions), "—") if f.positions else "—"), Text(f.message),
                        Text(related_words(related) or "—")]
                table.add_row(*row)
            console.print(table)
        else:  # narrow terminal: one heading line and one indented message line per finding
            for f, related in groups[:TOP]:
                where = [f"case {f.case}"] if many and f.case else []
                where += [f"layer {f.layer}"] if f.layer is not None else []
                where += [f.module] if f.module else []
                where += [POSITION_WORDS.get(str(f.positions), str(f.positions))] if f.positions else []
                head = Text("• ")
                head.append(f.cause, style="red")
                if where:
                    head.append("  " + ", ".join(where))
                console.print(head)
                console.print(Text("    " + " ".join(str(f.message).split()), style="dim"))
                if related:
                    console.print(Text("    + " + related_words(related), style="dim"))
        if len(groups) > TOP:
            console.print(Text(f"… and {len(groups) - TOP} more root cause(s) in the report", style="dim"))

    for name, path in (paths or {}).items():
        console.print(Text.assemble((f"{name} report: ", "dim"), (str(path), "cyan")))
