"""Per-layer comparison against an engine that only exposes its final hidden state (a live TurboMind).

A live TurboMind returns `last_hidden_state` after the final RMSNorm and nothing per layer. Deploying a
copy of the model truncated to k decoder layers (parity.deploy.truncate) makes that output
`norm(hidden_k)`: the final norm applied to decoder layer k-1's output. The reference side of the same
quantity is computed from the reference trace: the reference model's own final RMSNorm module applied to
the trace's "layer" point of layer k-1. The noise floor is the same computation on the floor trace (the
reference at the engine's precision), so the threshold is `Thresholds.threshold(floor, numeric)` exactly
as for every other point.

Modes:
* `every_layer`: one engine build per k (all layers, or a chosen subset).
* `bisect`: the first divergent layer in at most ceil(log2(L + 1)) <= ceil(log2 L) + 1 engine builds,
  assuming monotonicity (once a layer's output has diverged, every later layer's has).
* `plora_effect`: the engine's own PLoRA effect on the final hidden state (full model with LoRA minus the
  same model deployed without LoRA) against the reference's (a normal run minus a run with an all-False
  `im_mask`). Upstream's all-False branch adds `Plora_B(Plora_A(x[:, :1])) * 0` to row 0, which is exactly
  0 unless that LoRA output is non-finite (then row 0 becomes NaN and the effect is reported non-finite).

An engine factory is `make_engine(model_dir) -> engine` with `engine.final_hidden(call) -> [rows, hidden]`
and optionally `engine.close()`; engines are built lazily, one per model folder, and closed after use.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .compare.align import class_metrics, judge_classes, judge_value, positions_of
from .compare.metrics import compare, fmt_metric
from .compare.rowstats import row_stats_multi
from .compare.thresholds import Thresholds
from .checks.hidden import exceeded_finding
from .checks.plora import lora_cause
from .records import EngineCall, Finding, HFCall, PointResult, PreparedInput
from .trace import Trace

EngineFactory = Callable[[Path], Any]

# The engine's PLoRA effect below this fraction of the reference's means it applied no PLoRA at all.
NOT_APPLIED_RATIO = 0.1


# ------------------------------------------------------------------------------------------- reference side


@dataclass(frozen=True)
class FinalNorm:
    """A reference model's final RMSNorm applied as that model's capture applies it (parity.reference.capture):
    computing in the model's dtype, its weight first rounded to the dtype the deployment stores it in
    (`ReferenceModel.weights_dtype`: a float32 checkpoint's workspace holds float16 weights), and in a float64
    run with the code's float32 pins widened. So norm(hidden_L) is the trace's own "norm" point, bit for bit."""

    module: nn.Module
    dtype: torch.dtype
    weights_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, model) -> "FinalNorm":
        """The final norm of a `parity.reference.loader.ReferenceModel` (a session's `ref` or `floor_model`)."""
        return cls(model.anatomy.final_norm, model.dtype, model.weights_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .reference.precision import compute_dtype, widened_float32

        with torch.no_grad(), compute_dtype(self.module, [], self.dtype, via=self.weights_dtype), \
                widened_float32(self.dtype):
            return self.module(x.to(self.dtype)).to(torch.float64)


@dataclass
class LayerTarget:
    """The reference side of one case: `norm(hidden_k)` for every k, and its noise floor.

    `reference` is the reference trace (fp32), `floor` the same input at the engine's precision (the
    end-to-end floor trace: the engine's truncated model runs from its own embeddings, not teacher-forced).
    `final_norm` is the reference model's final RMSNorm as it applies it (`FinalNorm.of(session.ref)`),
    `floor_norm` the floor model's (None: use `final_norm`). `numeric` picks the threshold bounds ("fp32", or anything else for low precision).
    """

    case: str
    reference: Trace
    floor: Trace
    final_norm: FinalNorm
    classes: dict[str, torch.Tensor]
    numeric: str = "fp32"
    thresholds: Thresholds = field(default_factory=Thresholds)
    floor_norm: FinalNorm | None = None

    @property
    def num_layers(self) -> int:
        return self.reference.num_layers

    @property
    def rows(self) -> int:
        return int(next(iter(self.classes.values())).numel())

    def _hidden(self, trace: Trace, k: int) -> torch.Tensor:
        v = trace.get(k - 1, "layer")
        if v is None:
            raise ValueError(f"Trace {trace.root} has no 'layer' point for layer {k - 1}.")
        return v

    def expected(self, k: int) -> torch.Tensor:
        """norm(hidden_k): the reference's final norm applied to layer k-1's output (float64)."""
        return self.final_norm(self._hidden(self.reference, k))

    def floor_value(self, k: int) -> torch.Tensor:
        return (self.floor_norm or self.final_norm)(self._hidden(self.floor, k))

    @classmethod
    def from_session(cls, session, hcall: HFCall, prepared: PreparedInput, numeric: str = "fp32",
                     floor_dtype: torch.dtype | None = None, thresholds: Thresholds | None = None) -> "LayerTarget":
        """Build from a parity.reference.session.ReferenceSession (captures are cached by the session).

        `floor_dtype`: float64 for numeric "fp32" (the default), the engine's weight dtype otherwise.
        """
        from .compare.align import row_classes

        floor_dtype = floor_dtype or (torch.float64 if numeric == "fp32" else torch.bfloat16)
        ref = session.reference(hcall, prepared.name)
        floor_e2e = session.floor_e2e(hcall, prepared.name, floor_dtype)
        return cls(case=prepared.name, reference=ref, floor=floor_e2e, final_norm=FinalNorm.of(session.ref),
                   floor_norm=FinalNorm.of(session.floor_model(floor_dtype)), classes=row_classes(prepared),
                   numeric=numeric, thresholds=thresholds or Thresholds())


@dataclass
class LayerCase:
    """One input case: what the engine is fed and what its output should be."""

    target: LayerTarget
    call: EngineCall


# ------------------------------------------------------------------------------------------- results


@dataclass
class LayerResult:
    """The engine's final-norm output of a model truncated to `layers_kept` layers, against the reference.

    `layer` is the 0-based index of the last kept decoder layer (the report's layer numbering): the value
    compared is norm(output of decoder layer `layer`). `metrics` is parity.compare.metrics.compare plus
    `by_class` (each class with its own floor, threshold and exceeded flag).
    """

    case: str
    layer: int
    layers_kept: int
    metrics: dict[str, Any]
    floor: float
    threshold: float
    exceeded: bool
    positions: str | None
    model_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BisectResult:
    """First divergent layer found by bisection (None: the full model matches).

    `results` holds the LayerResults of every evaluated k, `builds` the number of engine builds used and
    `max_builds` the bound ceil(log2(L + 1)).
    """

    num_layers: int
    first_divergent_layer: int | None
    results: list[LayerResult]
    evaluated: list[int]
    builds: int
    max_builds: int
    seconds: float

    @property
    def first(self) -> LayerResult | None:
        if self.first_divergent_layer is None:
            return None
        hits = [r for r in self.results if r.layer == self.first_divergent_layer and r.exceeded]
        return hits[0] if hits else None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "results"},
                "results": [r.to_dict() for r in self.results]}


@dataclass
class PloraEffect:
    """The engine's own PLoRA effect on the final hidden state against the reference's.

    effect = final hidden with LoRA - final hidden without LoRA, per side. `ratio` is the engine's effect
    magnitude over the reference's on image rows; `cause` is None when the effects match, otherwise
    "lora_not_applied" (ratio below NOT_APPLIED_RATIO), "lora_scale_mismatch" (same direction, other
    magnitude) or "weight_mismatch" (another effect).
    """

    case: str
    metrics: dict[str, Any]
    ref_norm: float
    eng_norm: float
    ratio: float
    cosine: float
    floor: float
    threshold: float
    exceeded: bool
    cause: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- engine builds


class EngineBuilds:
    """Builds engines lazily, one per model folder, runs every call through it, closes it and memoises
    the outputs by (folder, call content hash). `count` is the number of engine builds."""

    def __init__(self, make_engine: EngineFactory):
        self.make_engine = make_engine
        self.count = 0
        self.seconds = 0.0
        self.log: list[str] = []
        self._out: dict[tuple[str, str], torch.Tensor] = {}

    def remember(self, model_dir: Path, call: EngineCall, final_hidden: torch.Tensor) -> None:
        """Record an output already obtained (e.g. the full model's end-to-end run) so it is not rebuilt."""
        self._out[(str(model_dir), call.content_hash)] = final_hidden.detach().to(torch.float64).cpu()

    def has(self, model_dir: Path, calls: Sequence[EngineCall]) -> bool:
        return all((str(model_dir), c.content_hash) in self._out for c in calls)

    def final_hidden(self, model_dir: Path, calls: Sequence[EngineCall]) -> list[torch.Tensor]:
        key = str(model_dir)
        todo = [c for c in calls if (key, c.content_hash) not in self._out]
        if todo:
            t = time.perf_counter()
            engine = self.make_engine(Path(model_dir))
            self.count += 1
            self.log.append(key)
            try:
                for c in todo:
                    out = engine.final_hidden(c)
                    self._out[(key, c.content_hash)] = out.detach().to(torch.float64).cpu()
            finally:
                close = getattr(engine, "close", None)
                if callable(close):
                    close()
                self.seconds += time.perf_counter() - t
        return [self._out[(key, c.content_hash)] for c in calls]


# ------------------------------------------------------------------------------------------- comparisons


def judge(ref: torch.Tensor, eng: torch.Tensor, floor_value: torch.Tensor, classes: dict[str, torch.Tensor],
          thresholds: Thresholds, numeric: str) -> tuple[dict[str, Any], float, float, bool, str | None]:
    """(metrics with per-class floor/threshold/exceeded, floor, threshold, exceeded, positions), judged as
    every other point is (`compare.align.judge_classes`)."""
    if eng.shape != ref.shape:
        raise ValueError(f"The engine returned shape {tuple(eng.shape)}; the reference has {tuple(ref.shape)}. "
                         "Both sides must run the same rows.")
    st_eng, st_floor = row_stats_multi(ref, [eng, floor_value])
    m, fm = class_metrics(st_eng, classes), class_metrics(st_floor, classes)
    threshold, exceeded = judge_classes(m, fm, thresholds, numeric)
    return m, fm["rel_l2"], threshold, exceeded, positions_of(m["by_class"]) if exceeded else None


def layer_results(k: int, cases: Sequence[LayerCase], models, builds: EngineBuilds) -> list[LayerResult]:
    """Build (or reuse) the k-layer engine, run every case, compare with norm(hidden_k)."""
    model_dir = _model_dir(models, k, "lora", builds, [c.call for c in cases])
    outs = builds.final_hidden(model_dir, [c.call for c in cases])
    _release(models, model_dir)
    res = []
    for c, eng in zip(cases, outs):
        t = c.target
        m, floor, thr, exc, pos = judge(t.expected(k), eng, t.floor_value(k), t.classes, t.thresholds, t.numeric)
        res.append(LayerResult(case=t.case, layer=k - 1, layers_kept=k, metrics=m, floor=floor, threshold=thr,
                               exceeded=exc, positions=pos, model_dir=str(model_dir)))
    return res


def _model_dir(models, k: int | None, variant: str, builds: EngineBuilds, calls: Sequence[EngineCall]) -> Path:
    """The folder for (k, variant); not (re)written when every output for it is already recorded."""
    k = models.layers if k is None else k
    path_for = getattr(models, "path_for", None)
    if callable(path_for):
        planned = Path(models.source) if (k == models.layers and variant == "lora") else path_for(k, variant)
        if builds.has(planned, calls):
            return planned
    return models.get(k, variant)


def _release(models, model_dir: Path) -> None:
    """Free a truncated copy's disk space once its outputs are recorded (TruncatedModels.release)."""
    release = getattr(models, "release", None)
    if callable(release):
        release(model_dir)


def _check_cases(cases: Sequence[LayerCase], models) -> int:
    if not cases:
        raise ValueError("No cases given.")
    L = models.layers
    for c in cases:
        if c.target.num_layers != L:
            raise ValueError(f"Case {c.target.case}: the reference trace has {c.target.num_layers} layers, the "
                             f"deployed model {models.source} has {L}.")
    return L


def every_layer(cases: Sequence[LayerCase], models, make_engine: EngineFactory | EngineBuilds,
                layers: Iterable[int] | None = None) -> list[LayerResult]:
    """LayerResults for every k in `layers` (1-based counts of kept layers; default 1..L)."""
    L = _check_cases(cases, models)
    builds = make_engine if isinstance(make_engine, EngineBuilds) else EngineBuilds(make_engine)
    out: list[LayerResult] = []
    for k in (range(1, L + 1) if layers is None else layers):
        out += layer_results(int(k), cases, models, builds)
    return out


def first_true(lo: int, hi: int, pred: Callable[[int], bool]) -> tuple[int | None, list[int]]:
    """Smallest k in [lo, hi] with pred(k) true, for a monotone pred (false...false true...true); None if
    none. Evaluates pred at most ceil(log2(hi - lo + 2)) times. Returns (k, evaluated ks in order)."""
    evaluated: list[int] = []
    a, b = lo, hi + 1  # answer in [a, b]; b = hi + 1 means "none"
    while a < b:
        mid = (a + b) // 2
        evaluated.append(mid)
        if pred(mid):
            b = mid
        else:
            a = mid + 1
    return (a if a <= hi else None), evaluated


def max_bisect_builds(num_layers: int) -> int:
    return math.ceil(math.log2(num_layers + 1))


def bisect(cases: Sequence[LayerCase], models, make_engine: EngineFactory | EngineBuilds) -> BisectResult:
    """The first decoder layer whose output (after the final norm) diverges in any case."""
    t0 = time.perf_counter()
    L = _check_cases(cases, models)
    builds = make_engine if isinstance(make_engine, EngineBuilds) else EngineBuilds(make_engine)
    start = builds.count
    results: dict[int, list[LayerResult]] = {}

    def diverged(k: int) -> bool:
        results[k] = layer_results(k, cases, models, builds)
        return any(r.exceeded for r in results[k])

    k, evaluated = first_true(1, L, diverged)
    return BisectResult(
        num_layers=L, first_divergent_layer=None if k is None else k - 1,
        results=[r for kk in evaluated for r in results[kk]], evaluated=evaluated, builds=builds.count - start,
        max_builds=max_bisect_builds(L), seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------------------------------- PLoRA on/off


def no_lora_call(hcall: HFCall) -> HFCall:
    """The same HF call with an all-False im_mask: the reference without its PLoRA branch."""
    from .inputs import rows_hash

    mask = torch.zeros_like(hcall.im_mask, dtype=torch.bool)
    emb = hcall.inputs_embeds.reshape(-1, hcall.inputs_embeds.shape[-1])
    return HFCall(inputs_embeds=hcall.inputs_embeds, im_mask=mask,
                  content_hash=rows_hash(emb, [False] * emb.shape[0]))


@dataclass
class PloraTarget:
    """The reference's PLoRA effect on the final hidden state of one case, and its floor."""

    case: str
    effect: torch.Tensor        # float64 [rows, hidden]: norm(full) - norm(no LoRA)
    floor_effect: torch.Tensor  # the same at the engine's precision
    classes: dict[str, torch.Tensor]
    numeric: str = "fp32"
    thresholds: Thresholds = field(default_factory=Thresholds)

    @classmethod
    def from_traces(cls, target: LayerTarget, reference_nolora: Trace, floor_nolora: Trace) -> "PloraTarget":
        L = target.num_layers
        no = target.final_norm(target._hidden(reference_nolora, L))
        fno = (target.floor_norm or target.final_norm)(target._hidden(floor_nolora, L))
        return cls(case=target.case, effect=target.expected(L) - no, floor_effect=target.floor_value(L) - fno,
                   classes=target.classes, numeric=target.numeric, thresholds=target.thresholds)

    @classmethod
    def from_session(cls, session, hcall: HFCall, target: LayerTarget,
                     floor_dtype: torch.dtype | None = None) -> "PloraTarget":
        floor_dtype = floor_dtype or (torch.float64 if target.numeric == "fp32" else torch.bfloat16)
        call, case = no_lora_call(hcall), f"{target.case}-nolora"
        ref_no, floor_no = session.reference(call, case), session.floor_e2e(call, case, floor_dtype)
        return cls.from_traces(target, ref_no, floor_no)


def _effect_metrics(ref: torch.Tensor, eng: torch.Tensor, classes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """compare() of two effects, with per-class errors measured against the *whole* reference effect's norm:
    rows the LoRA cannot reach (before the first image) have an exactly-zero reference effect, where a
    per-class relative error would divide by zero."""
    m = compare(ref, eng)
    total = float(torch.linalg.vector_norm(torch.nan_to_num(ref)))
    m["by_class"] = {}
    for name, rows in classes.items():
        if not bool(rows.any()):
            continue
        cm = compare(ref[rows], eng[rows])
        d = float(torch.linalg.vector_norm(torch.nan_to_num(eng[rows] - ref[rows], nan=math.inf)))
        cm["rel_l2"] = d / total if total > 0 else (0.0 if d == 0 else math.inf)
        m["by_class"][name] = {k: cm[k] for k in ("rel_l2", "max_abs", "cosine", "nonfinite_ref", "nonfinite_eng")}
        m["by_class"][name]["rows"] = int(rows.sum())
    return m


def plora_effect(targets: Sequence[tuple[PloraTarget, EngineCall]], models,
                 make_engine: EngineFactory | EngineBuilds) -> list[PloraEffect]:
    """The engine's PLoRA effect (full model with LoRA minus the no-LoRA deployment) per case: 2 builds.

    The error is relative to the reference effect's norm over all rows; the floor is the same on the floor
    traces and the threshold `Thresholds.threshold(floor, numeric)`.
    """
    builds = make_engine if isinstance(make_engine, EngineBuilds) else EngineBuilds(make_engine)
    calls = [c for _, c in targets]
    with_lora = builds.final_hidden(_model_dir(models, None, "lora", builds, calls), calls)
    nolora_dir = _model_dir(models, None, "nolora", builds, calls)
    without = builds.final_hidden(nolora_dir, calls)
    _release(models, nolora_dir)
    out = []
    for (pt, _), a, b in zip(targets, with_lora, without):
        if a.shape != pt.effect.shape or b.shape != pt.effect.shape:
            raise ValueError(f"Case {pt.case}: the engine returned shapes {tuple(a.shape)} / {tuple(b.shape)}; the "
                             f"reference has {tuple(pt.effect.shape)}. Both sides must run the same rows.")
        eng = a - b
        m = _effect_metrics(pt.effect, eng, pt.classes)
        floor = compare(pt.effect, pt.floor_effect)["rel_l2"]
        img = pt.classes.get("image")
        has_img = img is not None and bool(img.any())
        sel = img if has_img else torch.ones(eng.shape[0], dtype=torch.bool)
        ref_n = float(torch.linalg.vector_norm(pt.effect[sel]))
        eng_n = float(torch.linalg.vector_norm(eng[sel]))
        cos = m["by_class"]["image"]["cosine"] if has_img else m["cosine"]
        ratio = eng_n / ref_n if ref_n > 0 else (math.inf if eng_n > 0 else 1.0)
        if float(torch.linalg.vector_norm(pt.effect)) == 0.0:
            # nothing to compare against: judge the engine's effect against its own output's size
            m["rel_l2"] = float(torch.linalg.vector_norm(eng)) / max(float(torch.linalg.vector_norm(a)), 1e-30)
        thr, exc = judge_value(m["rel_l2"], floor, pt.thresholds, pt.numeric)
        cause, msg = None, (f"The engine's PLoRA effect matches the reference's (relative error {fmt_metric(m['rel_l2'])}, "
                            f"threshold {fmt_metric(thr)}; magnitude ratio {fmt_metric(ratio)}).")
        if ref_n == 0.0 and float(torch.linalg.vector_norm(pt.effect)) == 0.0:
            msg = "The reference's PLoRA changes nothing on this case (no image rows or zero LoRA)."
            if exc:
                cause = "lora_outside_mask"
                msg = ("The reference's PLoRA changes nothing on this case, but deploying with and without LoRA "
                       f"changes the engine's final hidden state (relative {fmt_metric(m['rel_l2'])}).")
        elif exc:  # the LoRA cause ladder of the PLoRA check, on the effect (factor: the magnitude ratio)
            cause = lora_cause(ratio < NOT_APPLIED_RATIO, cos, ratio, pt.thresholds)
            msg = {
                "lora_not_applied": (
                    f"The engine applies no PLoRA: deploying the model with and without LoRA changes its final "
                    f"hidden state on image rows by {fmt_metric(eng_n)}, {fmt_metric(100 * ratio)}% of the "
                    f"reference's change ({fmt_metric(ref_n)}). TurboMind ran as if the model had no PLoRA."),
                "lora_scale_mismatch": (
                    f"The engine's PLoRA effect points the same way as the reference's (cosine {cos:.6f}) but is "
                    f"{fmt_metric(ratio)}x its size on image rows: a wrong LoRA scale."),
                "weight_mismatch": (
                    f"The engine's PLoRA effect differs from the reference's: relative error "
                    f"{fmt_metric(m['rel_l2'])} (threshold {fmt_metric(thr)}, floor {fmt_metric(floor)}), cosine "
                    f"{cos:.4f}, magnitude ratio {fmt_metric(ratio)}."),
            }[cause]
        out.append(PloraEffect(case=pt.case, metrics=m, ref_norm=ref_n, eng_norm=eng_n, ratio=ratio, cosine=cos,
                               floor=floor, threshold=thr, exceeded=exc, cause=cause, message=msg))
    return out


# ------------------------------------------------------------------------------------------- findings


def findings(layers: Sequence[LayerResult] = (), effects: Sequence[PloraEffect] = (),
             engine: str = "live TurboMind") -> list[Finding]:
    """Findings for the report.

    Per case, the first layer of every run of exceeded layers (no passing evaluated layer between) is an error (check "hidden",
    point "layer", so the verdict orders it with every other hidden-state finding); the rest of the run is
    one "info" finding (an end-to-end value stays diverged once an earlier layer diverged). A mismatching
    PLoRA effect is an error of check "plora".
    """
    effect_findings = [
        Finding(check="plora", severity="error", cause=e.cause, layer=None, module=None, positions="image",
                case=e.case, message=f"{engine}: {e.message}",
                metrics={"rel_l2": e.metrics["rel_l2"], "ratio": e.ratio, "cosine": e.cosine, "floor": e.floor,
                         "threshold": e.threshold})
        for e in effects if e.cause is not None]
    out: list[Finding] = []
    by_case: dict[str, list[LayerResult]] = {}
    for r in layers:
        by_case.setdefault(r.case, []).append(r)
    for case, rs in by_case.items():
        rs = sorted({r.layers_kept: r for r in rs}.values(), key=lambda r: r.layers_kept)
        run: list[LayerResult] = []  # exceeded layers with no passing (evaluated) layer between them
        for r in rs + [None]:
            if r is not None and r.exceeded:
                run.append(r)
            elif run:
                out += _run_findings(run, case, effect_findings, engine)
                run = []
    return out + effect_findings


def _run_findings(run: list[LayerResult], case: str, prior: list[Finding], engine: str) -> list[Finding]:
    """The first layer of a run as the hidden check words every exceeded point (its cause by the verdict's
    precedence: the PLoRA on/off finding of the case explains image rows), the rest as one info finding."""
    r = run[0]
    point = PointResult(case=case, layer=r.layer, module="layer", e2e=r.metrics, local=r.metrics, floor=r.floor,
                        threshold=r.threshold, exceeded=r.exceeded)
    first = exceeded_finding(
        point, prior, where=f"layer {r.layer} ({engine}, model truncated to {r.layers_kept} layers)",
        measured="final-norm output's error against the reference's norm(hidden)",
        drift_note=(" The final-norm output cannot say which module inside the layer caused it; run the replay "
                    "engine on the same model for module-level attribution."),
        extra={"layers_kept": r.layers_kept, "engine": engine})
    cause = first.cause
    out = [first]
    if len(run) > 1:
        rest = [x.layer for x in run[1:]]
        out.append(Finding(
            check="hidden", severity="info", cause=cause, layer=rest[0], module="layer", positions="all", case=case,
            message=(f"layers {rest[0]}..{rest[-1]} ({engine}) stay diverged (relative errors "
                     f"{', '.join(fmt_metric(x.metrics['rel_l2']) for x in run[1:])}): a consequence of layer {r.layer}."),
            metrics={"layers": rest, "e2e_rel_l2": [x.metrics["rel_l2"] for x in run[1:]]},
        ))
    return out


# ------------------------------------------------------------------------------------------- pipeline entry


@dataclass
class PipelineCase:
    """What `run_parity` already has for one case when the live engine ran end to end."""

    prepared: PreparedInput
    hcall: HFCall
    call: EngineCall
    reference: Trace
    floor_e2e: Trace
    full_final_hidden: torch.Tensor | None = None  # the full model's output from the end-to-end run


def run_layers(mode: str, model: Path, cache_dir: Path, session, cases: Sequence[PipelineCase], numeric: str,
               floor_dtype: torch.dtype, thresholds: Thresholds, make_engine: EngineFactory,
               plora: bool = True, keep_copies: bool = False) -> tuple[list[Finding], dict[str, Any]]:
    """`--layers every|bisect` for run_parity: (findings, the report's `engine["layerwise"]` section).

    Truncated copies are made under `cache_dir/truncated` and removed afterwards (unless `keep_copies`:
    later runs on the same unchanged model then reuse them); the full model's outputs
    from the end-to-end run are reused, so bisection on a clean model costs ceil(log2(L + 1)) - 1 builds
    at most plus one for the no-LoRA deployment.
    """
    from .compare.align import row_classes
    from .deploy.truncate import TruncatedModels

    if mode not in ("every", "bisect"):
        raise ValueError(f"mode must be 'every' or 'bisect', got {mode!r}")
    t0 = time.perf_counter()
    final_norm = FinalNorm.of(session.ref)
    floor_norm = FinalNorm.of(session.floor_model(floor_dtype))
    lcases = []
    for c in cases:
        target = LayerTarget(case=c.prepared.name, reference=c.reference, floor=c.floor_e2e, final_norm=final_norm,
                             classes=row_classes(c.prepared), numeric=numeric, thresholds=thresholds,
                             floor_norm=floor_norm)
        lcases.append(LayerCase(target, c.call))
    section: dict[str, Any] = {"mode": mode}
    found: list[Finding] = []
    with TruncatedModels(model, Path(cache_dir) / "truncated", keep=keep_copies) as models:
        builds = EngineBuilds(make_engine)
        for c in cases:
            if c.full_final_hidden is not None:
                builds.remember(models.source, c.call, c.full_final_hidden)
        if mode == "every":
            layers = every_layer(lcases, models, builds)
        else:
            b = bisect(lcases, models, builds)
            layers = b.results
            section["bisect"] = {k: v for k, v in b.to_dict().items() if k != "results"}
        effects: list[PloraEffect] = []
        if plora:
            pts = [(PloraTarget.from_session(session, c.hcall, lc.target, floor_dtype), c.call)
                   for c, lc in zip(cases, lcases)]
            effects = plora_effect(pts, models, builds)
        found = findings(layers, effects)
        section.update(builds=builds.count, build_seconds=round(builds.seconds, 3),
                       seconds=round(time.perf_counter() - t0, 3), num_layers=models.layers,
                       results=[r.to_dict() for r in layers], plora_effect=[e.to_dict() for e in effects])
    return found, section
