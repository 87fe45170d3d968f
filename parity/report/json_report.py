"""report.json: the machine-readable report (the stable contract of `Report.to_dict()`).

The file is strict JSON (RFC 8259) — any conforming parser reads it, including
`json.loads(text, parse_constant=...)` set to reject the non-standard `NaN`/`Infinity` tokens.

Non-finite numbers
------------------
JSON has no NaN or infinity. A metric that is not finite (a NaN rel_l2, an inf max_abs) is written as
the **string** ``"nan"``, ``"inf"`` or ``"-inf"`` (never ``null``, which means "not measured": for example
``"local": null`` when no teacher-forced run was made). So a consumer tells "absent" from "broken".
`read_json(path)` returns the document as stored; `read_json(path, restore_nonfinite=True)` turns those
three strings back into floats everywhere.

Other conversions: tuples become lists, Paths and unknown objects strings, numpy / torch scalars numbers.

The file is written atomically (a temporary file in the same folder, fsync, `os.replace`): a reader —
or a CI job collecting artifacts — sees the old report or the complete new one, never half a file.

Example::

    from parity.report.json_report import write_json, read_json
    write_json(report, "reports/run1/report.json")
    doc = read_json("reports/run1/report.json")
    doc["status"], doc["first_divergence"]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from parity.records import Report
from parity.report._common import atomic_write_text, json_safe
from parity.report._common import restore_nonfinite as _restore

__all__ = ["report_to_json", "write_json", "read_json"]


def report_to_json(report: Report, *, indent: int | None = 1) -> str:
    """`report.to_dict()` as strict JSON text (non-finite floats as "nan"/"inf"/"-inf")."""
    data: Any = json_safe(report.to_dict())
    # allow_nan=False: a non-finite float that slipped through json_safe fails loudly here instead of
    # producing invalid JSON.
    return json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(report: Report, path: str | os.PathLike) -> Path:
    """Write report.json atomically; returns the path. Raises ParityInputError when the folder is unwritable."""
    return atomic_write_text(path, report_to_json(report))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name!r}")


def read_json(path: str | os.PathLike, *, restore_nonfinite: bool = False) -> dict[str, Any]:
    """Read a report.json back as a dict (strictly: NaN / Infinity tokens are rejected)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh, parse_constant=_reject_constant)
    return _restore(data) if restore_nonfinite else data
