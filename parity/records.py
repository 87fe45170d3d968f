"""Typed records passed between the pipeline's stages.

inputs -> reference capture -> deployment capture -> align -> checks -> verdict -> reports.
Each stage takes and returns these records; no stage reaches into another's internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

if TYPE_CHECKING:
    from .trace import Trace

BosPolicy = Literal["first", "every_text"]
Positions = Literal["image", "text", "all", "generated"]  # generated: rows of decode steps
Severity = Literal["error", "warning", "info"]

# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Segment:
    """One piece of a canonical input: text, or one image (a file path)."""

    kind: Literal["text", "image"]
    text: str = ""
    image: Path | None = None


@dataclass(frozen=True)
class Chat:
    """A case given as a chat turn: each side places the images where its own code does (the HF model's chat
    code for the reference, lmdeploy's `proc_messages` for the engine), so the placement itself is compared."""

    query: str
    images: tuple[Path, ...]
    system: str = ""


@dataclass(frozen=True)
class CanonicalInput:
    """A named test case. Both sides' calls are built from this one description."""

    name: str
    segments: tuple[Segment, ...]
    # "first": BOS on the first segment only (what lmdeploy does);
    # "every_text": BOS on every text part (what the XComposer2-7b chat code does).
    bos_policy: BosPolicy = "first"
    chat: Chat | None = None  # set: `segments` are replaced by each side's own placement of the chat


@dataclass
class PreparedInput:
    """The rows both sides must see, built once from a CanonicalInput.

    `embeddings` is the full input-embedding matrix (token embeddings with image features spliced in);
    `image_rows` is the row mask of image features; `ranges` the [begin, end) row spans of each image.
    """

    name: str
    token_ids: list[int]              # one id per row; image rows carry the placeholder id
    image_rows: torch.Tensor          # bool [rows]
    bos_rows: torch.Tensor            # bool [rows]
    embeddings: torch.Tensor          # float32 [rows, hidden]
    image_features: list[torch.Tensor]  # float32 [n_i, hidden], one per image, in order
    ranges: list[tuple[int, int]]
    bos_policy: BosPolicy
    placeholder_id: int
    text_parts: list[str] = field(default_factory=list)  # for the report: what each row span says
    row_labels: list[str] = field(default_factory=list)  # per row: decoded token or "<img k>"


@dataclass
class HFCall:
    """What the HF reference receives: `model(inputs_embeds=..., im_mask=...)`."""

    inputs_embeds: torch.Tensor  # [1, rows, hidden]
    im_mask: torch.Tensor        # bool [1, rows]
    content_hash: str


@dataclass
class EngineCall:
    """What a TurboMind-style engine receives (`input_ids`, `input_embeddings`, `input_embedding_ranges`)."""

    input_ids: list[int]
    input_embeddings: list[torch.Tensor]
    input_embedding_ranges: list[tuple[int, int]]
    content_hash: str


@dataclass
class CaseInput:
    """One case laid out for both sides (`parity.cases.lay_out_cases`): the rows the reference sees and each
    side's call built from its own rows."""

    name: str
    prepared: PreparedInput
    hf_call: HFCall
    engine_call: EngineCall

    @property
    def same_rows(self) -> bool:
        """The engine is asked for the reference's rows: teacher forcing is possible. With different rows (a BOS
        policy or range mismatch) only the engine's own run exists and the inputs check names the difference."""
        return len(self.engine_call.input_ids) == self.prepared.image_rows.numel()

    def request(self, captured: "ReferenceCapture", trace_dir: Path, keep_all_parts: bool) -> "EngineRequest":
        return EngineRequest(self.name, self.engine_call, self.prepared, self.hf_call, captured.reference,
                             captured.floor_e2e, self.same_rows, trace_dir, keep_all_parts=keep_all_parts)


# ---------------------------------------------------------------- reference side


@dataclass
class ReferenceCapture:
    """What the reference side captured for one case (`ReferenceSession.capture`): the fp32 trace and the noise
    floors at the engine's precision that the engine's judging needs."""

    reference: "Trace"
    floor_e2e: "Trace | None"                                  # end to end, as values, where captured
    floor_local: Any    # teacher-forced, as statistics (parity.compare.stream: StatsTrace, FloorOnDemand) or values


@dataclass(frozen=True)
class ReferenceInfo:
    """What the report says about the reference it judged with (`ReferenceSession.describe`)."""

    storage: str                   # the dtype its weights are held in ("float32")
    weights: str                   # how they relate to the deployment's (rounded to its dtype, or as loaded)
    device: dict[str, Any]         # parity.device.Placement.describe()
    applied: list[str]             # in-process fixes made to the loaded model


# ---------------------------------------------------------------- deployment side


@dataclass(frozen=True)
class RuntimeSemantics:
    """What one lmdeploy release range does with PLoRA (turbomind-plora.md, section 1)."""

    version: str
    converter_writes_lora: bool
    runtime_applies_plora: bool
    workspace_loads_lora: bool
    note: str = ""


@dataclass
class ConversionRecord:
    """What `parity convert` did: recorded next to the workspace as parity-conversion.json."""

    model: str
    workspace: str
    lmdeploy_version: str
    sub_type: str                 # "7b" | "4khd" | "2.5" as lmdeploy decided
    lora_config: dict[str, Any]
    tp: int
    warnings: list[str] = field(default_factory=list)
    # the source model's fingerprint (parity.deploy.source): {"shape": {...}, "tensors": {name: digest}}; {} in
    # records written before it was kept
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSettings:
    """What an engine resolved for a run: how it computes, and so how it is judged. The pipeline reads these
    instead of asking which engine it drives."""

    kind: str                  # "replay" | "turbomind" | ...
    numeric: str               # the precision the engine is judged at: "fp32" | "emulate"
    floor_dtype: torch.dtype   # the reference re-run at this dtype gives the noise floor
    teacher_forced: bool       # infer() also returns a run fed the reference's inputs (else local == e2e)
    serve_from: str            # "hf" | "workspace"
    weight_type: str           # the dtype the deployment computes in ("float16", "bfloat16", ...)


@dataclass(frozen=True)
class EngineWarning:
    """Something the engine noticed about its own deployment (not a judgement of the values): the checks
    turn it into a Finding with this check name and cause."""

    cause: str
    message: str
    check: str = "config"


@dataclass(frozen=True)
class EngineRanges:
    """How the engine read the call's `input_embedding_ranges` (TurboMind's validation)."""

    valid: bool
    reason: str | None
    accepted: tuple[tuple[int, int], ...]
    row_count_mismatch: bool


@dataclass
class FaultHooks:
    """Where the fault catalogue (and tests) inject a fault between stages: what a stage hands to the next is
    mutated, or a deployment detail deliberately mis-emulated. Passed beside the run's options, never inside
    them (`pipeline.run_parity(opts, faults)`), so a user's options cannot carry one; a plain run has none."""

    mutate_engine_call: Callable[[str, EngineCall], EngineCall] | None = None   # (case name, call) -> call
    mutate_hf_prepared: Callable[[PreparedInput], PreparedInput] | None = None
    mutate_engine_prepared: Callable[[PreparedInput], PreparedInput] | None = None
    lmdeploy_vision_fault: Any = None     # parity.deploy.image_input.VisionFault
    decode_deviations: Any = None         # parity.deploy.decode.DecodeDeviations
    kv_scale_factor: float = 1.0          # the engine's quantized KV cache read with a wrong scale (--quant-policy)


@dataclass
class EngineRequest:
    """One case for an engine: the call, what the reference side holds for it (an engine that can be
    teacher-forced feeds each module the reference's input; one with follow-up runs reuses the rest), and
    where to write its traces."""

    case: str
    call: EngineCall
    prepared: PreparedInput
    hf_call: HFCall
    reference: "Trace"
    floor_e2e: "Trace | None"      # the reference end to end at the engine's precision, where it was captured
    same_rows: bool                # the call has the reference's rows (teacher forcing is possible)
    trace_dir: Path
    keep_all_parts: bool = False   # write every PLoRA part (--keep-traces), not only those the checks read


@dataclass
class EngineRun:
    """What an engine returned for one request. `local` is the teacher-forced trace, or `trace` itself when
    the engine cannot be teacher-forced. Masks are 0/1 per row, None where the engine does not expose them."""

    trace: "Trace"
    local: "Trace"
    settings: EngineSettings
    ranges: EngineRanges | None = None          # None: the engine does not report its range validation
    image_rows: torch.Tensor | None = None      # rows the engine derived from its ranges
    lora_rows: torch.Tensor | None = None       # rows the engine applied LoRA on
    warnings: list[EngineWarning] = field(default_factory=list)

    @property
    def ranges_rejected(self) -> bool:
        return self.ranges is not None and not self.ranges.valid


@dataclass
class EngineSummary:
    """What an engine hands back when deactivated: its part of the report's `engine` section, warnings, and
    the findings of any follow-up strategy it ran (the live engine's per-layer runs)."""

    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[EngineWarning] = field(default_factory=list)
    findings: list["Finding"] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class DeployedCase:
    """One case after the deployment stage: its inputs, the reference's captures, and the engine's run (None
    where the engine refused the workspace: `refused`), with its decode section under --decode."""

    case: CaseInput
    captured: ReferenceCapture
    run: EngineRun | None
    refused: Exception | None = None   # parity.errors.EngineRefused
    decode: "DecodeSection | None" = None


# ---------------------------------------------------------------- findings and report


@dataclass
class Finding:
    check: str
    severity: Severity
    cause: str
    message: str
    layer: int | None = None
    module: str | None = None
    positions: Positions | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    case: str | None = None
    step: int | None = None  # decode: index of the generated token (0: predicted by the prefill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FindingGroup:
    """One root cause and the findings it explains (indices into `Report.findings`): what one fault looks
    like from every check that saw it (`parity.verdict.group_findings`)."""

    root: int
    related: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "related": list(self.related)}


@dataclass
class Divergence:
    layer: int | None
    module: str | None
    positions: Positions | None
    cause: str
    case: str | None = None
    message: str = ""
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Cause tags (issue 4); checks must use only these.
CAUSES: tuple[str, ...] = (
    "weight_mismatch",
    "missing_tensor",
    "shape_mismatch",
    "lora_rank_mismatch",
    "lora_scale_mismatch",
    "lora_not_applied",
    "lora_outside_mask",
    "im_mask_mismatch",
    "embeddings_skipped",
    "bias_dropped",
    "config_mismatch",
    "input_mismatch",
    "nonfinite",
    "numeric_drift",
    "unsupported_version",
    "workspace_from_other_model",  # the workspace's source model is not the model given (checks.source)
    "lora_smoothing_mismatch",   # AWQ smoothing scaled a linear's base weights but not its Plora_A/Plora_B
    "kv_quant_drift",            # the quantized KV cache moves attention beyond its budget
    # decode phase (issue 18)
    "position_mismatch",
    "kv_cache_precision",
    "session_truncated",
    "rope_mismatch",
)
# Causes about the checked model against its original (what quantization did to it), not the deployment against
# the checked model: they explain no difference between the engine and the reference.
ORIGINAL_MODEL_CAUSES: tuple[str, ...] = ("lora_smoothing_mismatch",)


@dataclass
class PointResult:
    """One comparison of one canonical point of one case.

    `e2e` compares the engine's own forward with the reference; `local` compares the engine fed the
    reference's inputs (teacher-forced), which is where an error is *created*. Metric dicts hold:
    cosine, rel_l2, max_abs, max_abs_row, max_abs_col, mean_abs, nonfinite_ref, nonfinite_eng, and
    `by_class` {"image"|"text"|"bos": {rel_l2, max_abs, cosine, rows}}.
    `floor` is the reference against itself at the engine's precision (relative L2), `threshold` the
    limit the local error was judged against.
    """

    case: str
    layer: int | None
    module: str
    e2e: dict[str, Any]
    local: dict[str, Any] | None
    floor: float | None  # None: not measured, the verdict did not depend on it (FloorOnDemand)
    threshold: float
    row_err: list[float] = field(default_factory=list)
    exceeded: bool = False


@dataclass
class CaseSummary:
    """What the report shows about one input case."""

    name: str
    rows: int
    bos_policy: str
    image_spans: list[tuple[int, int]]
    bos_rows: list[int]
    row_labels: list[str]
    hashes: dict[str, str]
    # Row masks as 0/1 lists: what HF received, what the engine derived from its ranges, the canonical one.
    masks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, p: PreparedInput, hashes: dict[str, str], masks: dict[str, list[int]]) -> "CaseSummary":
        return cls(name=p.name, rows=len(p.token_ids), bos_policy=p.bos_policy,
                   image_spans=[tuple(r) for r in p.ranges], bos_rows=[i for i, b in enumerate(p.bos_rows.tolist()) if b],
                   row_labels=p.row_labels, hashes=hashes, masks=masks)


# ---------------------------------------------------------------- decode (issue 18)


@dataclass
class DecodeStep:
    """One decode forward of an engine: the token fed at `position`, predicting generated token `step`.

    Values are one row each, keyed (layer, point) as in traces (layer None for embeddings, norm, output):
    `e2e` is the engine's own state (its own KV cache, the reference's tokens), `local` the engine fed the
    reference's values module by module (its cache built from the reference's keys and values). Step 0 is the
    prefill's last row: only `e2e[(None, "output")]` is set. What the engine did is reported beside what
    TurboMind 0.7.1 does (`expected_*`), so a check can say why a step differs.
    """

    step: int
    token: int | None
    position: int | None
    expected_position: int | None
    rope_theta: float | None
    expected_rope_theta: float | None
    e2e: dict[tuple[int | None, str], torch.Tensor]
    local: dict[tuple[int | None, str], torch.Tensor] = field(default_factory=dict)


@dataclass
class DecodeSection:
    """The report's `decode` entry for one case (README, "report.json")."""

    case: str
    requested: int                          # --decode N: generated tokens asked for
    prompt_rows: int
    steps_run: int                          # generated tokens the engine produced (fewer: session ended)
    matched_prefix: int                     # free-running: tokens equal before the first divergent one
    first_divergent_step: int | None
    tokens: list[dict[str, Any]] = field(default_factory=list)   # per step: both tokens, logprobs, top-k
    points: list[dict[str, Any]] = field(default_factory=list)   # per step/layer/module: local, e2e, floor, ...
    engine: dict[str, Any] = field(default_factory=dict)         # session_len, kv storage, truncated_at, ...
    logprob_noise: float = 0.0              # the reference's own logit wobble at the engine's precision


@dataclass
class Report:
    status: Literal["pass", "fail", "error"]
    engine: dict[str, Any]                 # {"kind", "lmdeploy_version", "numeric", "semantics", ...}
    model: str
    workspace: str | None
    findings: list[Finding]
    first_divergence: Divergence | None
    points: list[PointResult] = field(default_factory=list)
    cases: list[CaseSummary] = field(default_factory=list)
    config_audit: list[dict[str, Any]] = field(default_factory=list)   # {field, hf, engine, ok, note}
    weights_audit: list[dict[str, Any]] = field(default_factory=list)  # {tensor, status, shape, max_abs_diff}
    plora_table: list[dict[str, Any]] = field(default_factory=list)    # {case, layer, linear, rank_ref, ...}
    thresholds: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    parity_version: str = ""
    decode: list[DecodeSection] = field(default_factory=list)
    written_to: str | None = field(default=None, compare=False)  # the report folder, once written (not in JSON)
    # quantized deployments: {"smoothing": [...], "cost": {...}} (parity.quant); empty otherwise
    quantization: dict[str, Any] = field(default_factory=dict)
    # the error findings by root cause (parity.verdict.group_findings); empty: not grouped (a hand-made Report)
    groups: list[FindingGroup] = field(default_factory=list)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def __repr__(self) -> str:
        """Short: a failing `assert report` shows this, not every point and finding of the run."""
        d = self.first_divergence
        where = f", first divergence: layer {d.layer} {d.module} {d.positions} ({d.cause})" if d else ""
        return (f"<Report {self.status.upper()} for {self.model}: {len(self.errors())} error(s){where}; "
                f"report: {self.written_to or 'not written'}>")

    def __bool__(self) -> bool:  # truthy on pass, like Polygraphy's results
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON contract (README, "report.json")."""
        return {
            "status": self.status,
            "engine": self.engine,
            "model": self.model,
            "workspace": self.workspace,
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "findings": [f.to_dict() for f in self.findings],
            "groups": [g.to_dict() for g in self.groups],
            "layers": [asdict(p) for p in self.points],
            "cases": [asdict(c) for c in self.cases],
            "config_audit": self.config_audit,
            "weights_audit": self.weights_audit,
            "plora": self.plora_table,
            "thresholds": self.thresholds,
            "timings": self.timings,
            "parity_version": self.parity_version,
            "quantization": self.quantization,
            "decode": [asdict(d) for d in self.decode],
        }


def engine_section(kind: str, semantics: RuntimeSemantics, settings: EngineSettings, serve_from: str,
                   weight_type: str, conversion: ConversionRecord | None, reference: ReferenceInfo,
                   summary: EngineSummary, image_input: dict[str, Any]) -> dict[str, Any]:
    """The report's `engine` entry (README, "report.json"): the deployment as run, the reference it was judged
    against, and the engine's own part (`EngineSummary.report`)."""
    section = {"kind": kind, "lmdeploy_version": semantics.version, "numeric": settings.numeric,
               "serve_from": serve_from, "semantics": semantics.__dict__, "weight_type": weight_type,
               "sub_type": conversion.sub_type if conversion else None, "reference_storage": reference.storage,
               "reference_weights": reference.weights,
               "conversion_warnings": conversion.warnings if conversion else [], "device": reference.device,
               "reference_applied": reference.applied, **summary.report}
    if image_input:
        section["image_input"] = image_input
    return section
