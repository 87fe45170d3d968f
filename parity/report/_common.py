"""Helpers shared by the report writers: number formatting, JSON-safe conversion, atomic writes, and the
plain-words description of the first divergence (the sentence every output leads with)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable

from parity.atomic import write_file
from parity.errors import ParityInputError

# ---------------------------------------------------------------- numbers

NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _as_number(x: Any) -> Any:
    """numpy / torch scalars -> Python numbers; anything else unchanged."""
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    item = getattr(x, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return x
    return x


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number for humans: 3 significant digits, scientific below 1e-3 and from 1e4, NaN / inf / -inf
    for non-finite values, an em dash for None. Non-numbers are returned as text."""
    x = _as_number(x)
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        low = x.strip().lower()
        if low in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
            return fmt_num(float(low))
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            return "NaN" if math.isnan(x) else nonfinite_name(x)
        if x == 0:
            return "0"
        a = abs(x)
        if a < 1e-3 or a >= 1e4:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_value(v: Any) -> str:
    """Any audit / engine-info value as one short line (dicts as `k=v, …`, lists as `[a, b]`)."""
    v = _as_number(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(val)}" for k, val in v.items())
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            head = ", ".join(fmt_value(e) for e in v[:12])
            return f"[{head}, … {len(v) - 12} more]"
        return "[" + ", ".join(fmt_value(e) for e in v) + "]"
    if isinstance(v, (float, int, bool)) or v is None:
        return fmt_num(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)


def nonfinite_name(x: float) -> str:
    """A non-finite float's JSON spelling: "nan", "inf" or "-inf" (the keys of NONFINITE_STRINGS)."""
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def is_finite_number(x: Any) -> bool:
    x = _as_number(x)
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def to_float(x: Any) -> float | None:
    """A metric as a float (None when absent / not a number); non-finite strings become floats."""
    x = _as_number(x)
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[x.strip().lower()]
    return None


# ---------------------------------------------------------------- JSON-safe conversion


def json_safe(obj: Any) -> Any:
    """Recursively turn `obj` into values strict JSON can hold.

    Non-finite floats become the strings "nan", "inf", "-inf"; tuples/sets become lists; Paths and other
    objects become strings; numpy / torch scalars become numbers; small tensors / arrays become lists;
    dataclasses become dicts; dict keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else nonfinite_name(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays / torch tensors and their scalars
    if callable(tolist):
        try:
            return json_safe(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def restore_nonfinite(obj: Any) -> Any:
    """Inverse of the non-finite encoding: "nan"/"inf"/"-inf" strings back to floats (everywhere)."""
    if isinstance(obj, str):
        return NONFINITE_STRINGS.get(obj, obj)
    if isinstance(obj, dict):
        return {k: restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_nonfinite(v) for v in obj]
    return obj


# ---------------------------------------------------------------- atomic writes


def _unwritable(folder: Path, exc: BaseException) -> ParityInputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ParityInputError(
        f"Cannot write into the folder '{folder}': {reason}. Choose an output folder that exists (or can be "
        f"created), that this user may write to and that has free space, for example with --out reports/run1."
    )


def ensure_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` (and parents); raise ParityInputError naming it when that is impossible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(folder, exc) from exc
    if not folder.is_dir():
        raise _unwritable(folder, NotADirectoryError(20, "it is not a folder"))
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (`parity.atomic.write_file`: temp file beside it, fsync, os.replace);
    an unwritable folder raises ParityInputError naming it."""
    path = Path(path)
    try:
        return write_file(path, text)
    except OSError as exc:
        raise _unwritable(path.parent, exc) from exc


# ---------------------------------------------------------------- words

POSITION_WORDS = {"image": "image rows", "text": "text rows", "all": "all rows", "generated": "generated row"}
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def sorted_findings(findings: Iterable[Any]) -> list[Any]:
    """Errors first, then warnings, then info; stable within a severity."""
    return sorted(findings, key=lambda f: SEVERITY_ORDER.get(getattr(f, "severity", "info"), 3))


def finding_groups(report: Any) -> list[tuple[Any, list[Any]]]:
    """The report's error findings by root cause: (root, related findings) in the order of the roots.
    `report.groups` as the pipeline recorded it; a hand-made Report without groups is grouped here."""
    from parity.verdict import group_findings

    findings = list(report.findings)
    groups = getattr(report, "groups", None) or group_findings(findings)
    return [(findings[g.root], [findings[j] for j in g.related]) for g in groups]


def related_words(related: Iterable[Any]) -> str:
    """'34 related: 4 config, 15 plora, 15 hidden; layers 0–2' (the collapsed part of a group, in one line)."""
    related = list(related)
    if not related:
        return ""
    checks: dict[str, int] = {}
    for f in related:
        checks[f.check] = checks.get(f.check, 0) + 1
    layers = sorted({f.layer for f in related if f.layer is not None})
    span = ""
    if layers:
        span = (f"; layers {layers[0]}–{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
                else f"; layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    return f"{len(related)} related: " + ", ".join(f"{n} {c}" for c, n in checks.items()) + span


def where_words(layer: Any, module: Any, positions: Any, step: Any = None) -> str:
    """'Layer 0, module attention.wqkv, image rows' (parts that are None are left out); decode findings
    start with 'Decode step k'."""
    parts = []
    if step is not None:
        parts.append(f"Decode step {step}")
    if layer is not None:
        parts.append(f"layer {layer}" if parts else f"Layer {layer}")
    if module:
        parts.append(f"module {module}" if parts else f"Module {module}")
    if positions:
        parts.append(POSITION_WORDS.get(str(positions), f"{positions} rows"))
    return ", ".join(parts)


def divergence_parts(report: Any, with_case: bool | None = None) -> tuple[str, str, str]:
    """(where, cause, message) of the first divergence — or of the first error finding when the report has
    no first_divergence; ("", "", text) on a report without either. `where` reads like
    "Case 'two': Layer 0, module attention.wqkv, image rows" (the case only when asked / several cases)."""
    if with_case is None:
        with_case = len(getattr(report, "cases", []) or []) > 1
    d = getattr(report, "first_divergence", None)
    src = d
    if src is None:
        errs = [f for f in report.findings if f.severity == "error"]
        src = errs[0] if errs else None
    if src is None:
        if report.status == "pass":
            return "", "", "No divergence: every compared point is within its threshold."
        return "", "", "No divergence was located (see the findings)."
    where = where_words(src.layer, src.module, src.positions, getattr(src, "step", None))
    msg = " ".join(str(src.message or "").split())
    if not msg and d is not None:
        # A Divergence without a message: borrow the matching error finding's message.
        for f in report.findings:
            if f.severity == "error" and f.cause == d.cause and f.layer == d.layer and f.module == d.module:
                msg = " ".join(str(f.message).split())
                break
    case = getattr(src, "case", None)
    if with_case and case:
        where = f"Case '{case}': {where}" if where else f"Case '{case}'"
    return where, str(src.cause or ""), msg


def divergence_sentence(report: Any, with_case: bool | None = None) -> str:
    """The first divergence in plain words, e.g.
    "Layer 0, module attention.wqkv, image rows: lora_scale_mismatch — LoRA scale 2.0 vs 1.0".

    Falls back to the first error finding when the report has no first_divergence; on a clean report it
    says so. `with_case`: prefix the case name (default: when the report has several cases).
    """
    where, cause, msg = divergence_parts(report, with_case)
    if not cause:
        return msg
    text = f"{where}: {cause}" if where else cause
    return f"{text} — {msg}" if msg else text


def status_word(status: str) -> str:
    return {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}.get(str(status).lower(), str(status).upper())
