"""What each lmdeploy release does with PLoRA (turbomind-plora.md, section 1).

`VERSION_TABLE` has one row per release range; `semantics_for(version)` maps an installed/target version to
its `RuntimeSemantics`. The known-good deployment target is lmdeploy 0.7.1, the last release whose TurboMind
applies PLoRA on image rows.

The workspace trap holds for every range: TurboMind's C++ workspace loader
(`LlamaDecoderLayerWeight::loadModel`) reads only `.weight/.bias/.qweight/.scales/.zeros` files and never the
`lora_a`/`lora_b` files the converter writes, so a model served from a converted workspace folder runs with
uninitialised LoRA buffers. Only serving straight from the HF folder (in-memory conversion) fills them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ParityInputError
from ..records import RuntimeSemantics

KNOWN_GOOD_VERSION = "0.7.1"

WORKSPACE_TRAP = (
    "TurboMind's C++ workspace loader (LlamaDecoderLayerWeight::loadModel) reads only .weight/.bias/.qweight/"
    ".scales/.zeros files, never lora_a/lora_b: a model served from a converted workspace folder has "
    "uninitialised LoRA buffers. Serve from the HF folder so the in-memory conversion fills them."
)


@dataclass(frozen=True)
class VersionRow:
    """One release range, [first, last] inclusive (`last` None = open-ended)."""

    first: str
    last: str | None
    converter_writes_lora: bool
    runtime_applies_plora: bool
    workspace_loads_lora: bool
    supported: bool  # False: XComposer2 is not a TurboMind model at all in this range
    summary: str

    @property
    def label(self) -> str:
        return f"{self.first} – {self.last}" if self.last else f"{self.first} and later"


VERSION_TABLE: tuple[VersionRow, ...] = (
    VersionRow(
        "0.4.0", "0.7.1", True, True, False, True,
        "Converter writes lora_a/lora_b and TurboMind applies PLoRA on the injected (image) rows. "
        "0.7.1 is the last release that does: the known-good target.",
    ),
    VersionRow(
        "0.7.2", "0.7.3", True, False, False, True,
        "Converter writes lora_a/lora_b but TurboMind never allocates the LoRA mask buffer, so PLoRA is "
        "skipped silently: image rows diverge from layer 0 on, text rows do not.",
    ),
    VersionRow(
        "0.8.0", "0.9.1", True, False, False, True,
        "Converter writes lora_a/lora_b but the C++ side no longer holds LoRA weights; they are dropped "
        "silently and the model runs as if it had no PLoRA (image rows diverge from layer 0 on).",
    ),
    VersionRow(
        "0.9.2", "0.13.0", False, False, False, True,
        "Converter refuses PLoRA checkpoints: module.py Attn._export asserts on Plora_A (loud failure).",
    ),
    VersionRow(
        "0.14.0", None, False, False, False, False,
        "XComposer2 was removed from TurboMind (and its vision side from 0.15): no deployment possible.",
    ),
)

FIRST_SUPPORTED = VERSION_TABLE[0].first


def _release(text: str) -> tuple[int, int, int]:
    return tuple(int(x) for x in text.split("."))  # type: ignore[return-value]


_VERSION_RE = re.compile(
    r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?"            # release
    r"(?:[.\-_]?(?:a|b|rc|alpha|beta|dev|post)\.?\d*)*"  # pre/post/dev tags (ignored for the range)
    r"(?:\+[0-9A-Za-z.\-_]+)?\s*$"             # local tag, e.g. +cu118
)


def parse_version(version: str) -> tuple[int, int, int]:
    """Release tuple (major, minor, patch) of a version string such as '0.7.1', 'v0.7.2rc1', '0.7.1+cu118'.

    Pre/post/dev tags are ignored: '0.7.2rc1' is treated as the 0.7.2 code line.
    """
    if not isinstance(version, str):
        raise ParityInputError(
            f"lmdeploy version {version!r} is not a version string; expected something like "
            f"'{KNOWN_GOOD_VERSION}'. {_supported_text()}"
        )
    m = _VERSION_RE.match(version)
    if not m:
        raise ParityInputError(
            f"lmdeploy version {version!r} cannot be parsed; expected 'MAJOR.MINOR.PATCH' such as "
            f"'{KNOWN_GOOD_VERSION}'. {_supported_text()}"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _supported_text() -> str:
    rows = "; ".join(f"{r.label}: {_short(r)}" for r in VERSION_TABLE)
    return f"Known lmdeploy ranges: {rows}. The known-good target is {KNOWN_GOOD_VERSION}."


def _short(r: VersionRow) -> str:
    if not r.supported:
        return "XComposer2 removed from TurboMind (unsupported)"
    if not r.converter_writes_lora:
        return "converter asserts on PLoRA"
    if r.runtime_applies_plora:
        return "writes and applies PLoRA"
    return "writes PLoRA, runtime ignores it silently"


def row_for(version: str) -> VersionRow:
    """The table row covering `version`; ParityInputError when it is outside every range or unparseable."""
    rel = parse_version(version)
    for row in VERSION_TABLE:
        lo = _release(row.first)
        if rel < lo:
            continue
        if row.last is None or rel <= _release(row.last) or _in_gap(rel, row):
            return row
    raise ParityInputError(
        f"lmdeploy version {version!r} predates PLoRA support in TurboMind (first release with it: "
        f"{FIRST_SUPPORTED}). {_supported_text()}"
    )


def _in_gap(rel: tuple[int, int, int], row: VersionRow) -> bool:
    """Versions between a row's last release and the next row's first (e.g. a 0.13.5 that never existed)
    belong to the earlier row."""
    idx = VERSION_TABLE.index(row)
    if idx + 1 >= len(VERSION_TABLE):
        return True
    return rel < _release(VERSION_TABLE[idx + 1].first)


def semantics_for(version: str) -> RuntimeSemantics:
    """What lmdeploy `version` does with PLoRA.

    Raises ParityInputError (naming the version and the supported ranges) for unparseable versions, versions
    before 0.4.0 and versions where XComposer2 is no longer a TurboMind model (0.14.0 and later).
    """
    row = row_for(version)
    if not row.supported:
        raise ParityInputError(
            f"lmdeploy version {version!r} is not supported: {row.summary} {_supported_text()}"
        )
    note = row.summary
    if row.converter_writes_lora:
        note = f"{note} Workspace trap: {WORKSPACE_TRAP}"
    return RuntimeSemantics(
        version=version,
        converter_writes_lora=row.converter_writes_lora,
        runtime_applies_plora=row.runtime_applies_plora,
        workspace_loads_lora=row.workspace_loads_lora,
        note=note,
    )


def semantics_for_run(version: str) -> RuntimeSemantics:
    """`semantics_for`, for a parity run against `version`: also refuses the releases whose converter cannot
    write a PLoRA workspace at all (0.9.2 – 0.13.0 assert on `Plora_A`), since no TurboMind deployment of the
    model exists there to compare with. Those versions stay known to `semantics_for` (the table, the report).
    """
    sem = semantics_for(version)
    if not sem.converter_writes_lora:
        last_writer = max((r for r in VERSION_TABLE if r.converter_writes_lora), key=lambda r: _release(r.first))
        raise ParityInputError(
            f"lmdeploy version {version!r} cannot deploy a PLoRA model, so there is nothing to compare: "
            f"{row_for(version).summary} Pass a release whose converter writes PLoRA ({FIRST_SUPPORTED} – "
            f"{last_writer.last}). {_supported_text()}"
        )
    return sem


def is_known_good(version: str) -> bool:
    """True when `version` both writes and applies PLoRA (0.4.0 – 0.7.1)."""
    try:
        row = row_for(version)
    except ParityInputError:
        return False
    return row.supported and row.converter_writes_lora and row.runtime_applies_plora


def table_rows() -> list[dict[str, object]]:
    """VERSION_TABLE as plain dicts (for report.json / the README)."""
    return [
        {
            "range": r.label,
            "first": r.first,
            "last": r.last,
            "converter_writes_lora": r.converter_writes_lora,
            "runtime_applies_plora": r.runtime_applies_plora,
            "workspace_loads_lora": r.workspace_loads_lora,
            "supported": r.supported,
            "summary": r.summary,
        }
        for r in VERSION_TABLE
    ]
