"""The straight line: inputs -> reference capture -> deployment capture -> align -> checks -> verdict -> report.

`run_parity` is the one entry point the CLI, the pytest plugin and the fault catalogue share. Each stage
takes and returns records; this module only orders them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .checks import config as config_check
from .checks import hidden as hidden_check
from .checks import inputs as inputs_check
from .checks import mask as mask_check
from .checks import nonfinite as nonfinite_check
from .checks import plora as plora_check
from .checks import weights as weights_check
from .checks.base import CheckContext
from .compare.align import CaseTraces, compare_case
from .compare.thresholds import Thresholds
from .device import Placement, judged_precision, resolve_device, supports_float64
from .errors import EngineRefused, ParityInputError
from .inputs import default_cases, engine_call, engine_rows, hf_call, load_cases, prepare
from .places import default_cache_dir
from .points import PLORA_PARTS, UNCHECKED_PARTS
from .records import CanonicalInput, CaseSummary, Finding, PreparedInput, Report
from .reference.loader import ReferenceModel
from .reference.session import ReferenceSession
from .verdict import decide, sort_findings

_UNREAD_PARTS = frozenset(UNCHECKED_PARTS)
_PLORA_PARTS = frozenset(PLORA_PARTS)


@dataclass
class RunOptions:
    model: Path
    workspace: Path | None = None
    engine: str = "replay"
    lmdeploy_version: str | None = None
    inputs: Path | None = None
    cases: list[CanonicalInput] | None = None       # programmatic alternative to `inputs`
    numeric: str = "fp32"                            # "fp32" | "emulate" (deployment dtype)
    serve_from: str = "hf"                           # "hf" | "workspace" (the workspace-loading trap)
    trust_remote_code: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    cache_dir: Path = field(default_factory=default_cache_dir)  # parity.places
    keep_traces: Path | None = None
    session: ReferenceSession | None = None          # share reference captures across runs
    low_memory: bool | None = None                   # weights in the checkpoint dtype (default: when fp32 won't fit)
    layers: str | None = None                        # "every" | "bisect": per-layer values from the live engine
    live: dict[str, Any] = field(default_factory=dict)  # LiveTurboMind options (session_len, dtype, ...)
    device: str = "cpu"                              # cpu | cuda | cuda:N | auto (parity.device)
    original: Path | None = None                     # a quantized model's original: smoothing check, cost report
    # Hooks for the fault catalogue: mutate what a stage hands to the next (never used by plain runs).
    mutate_engine_call: Callable[[str, Any], Any] | None = None
    mutate_hf_prepared: Callable[[PreparedInput], PreparedInput] | None = None
    mutate_engine_prepared: Callable[[PreparedInput], PreparedInput] | None = None


def _engine(opts: RunOptions, ws, semantics, device: torch.device):
    if opts.engine == "replay":
        from .deploy.replay import ReplayEngine

        return ReplayEngine(ws, semantics, numeric=opts.numeric, serve_from=opts.serve_from, device=device)
    if opts.engine == "turbomind":
        from .deploy.live import LiveTurboMind  # raises EngineUnavailable (exit 2) without CUDA/TurboMind

        return LiveTurboMind(ws.root if opts.serve_from == "workspace" else opts.model, **opts.live)
    raise ParityInputError(f"Unknown engine {opts.engine!r}; expected 'replay' or 'turbomind'.")


def _float64_floor(placement: Placement) -> torch.dtype:
    """The fp32 mode's noise floor runs in float64; a device without it cannot judge float32 (exit 2)."""
    if not supports_float64(placement.device):
        raise ParityInputError(f"--device {placement.spec}: {placement.device.type} has no float64, which the "
                               "fp32 mode's noise floor needs; use --device cpu or a CUDA GPU.")
    return torch.float64


def _hf_plora(ref: ReferenceModel) -> dict[int, dict[str, dict[str, Any]]]:
    return {
        i: {p: {"rank": lin.rank, "scale": lin.scale, "has_bias": lin.module.bias is not None}
            for p, lin in lins.items()}
        for i, lins in ref.anatomy.linears.items()
    }


def _hf_tm_tensors(ref: ReferenceModel, ws):
    """The HF weights as a faithful conversion would write them. Shaped by the HF config (the truth), so a
    wrong head count in config.yaml shows up as a difference instead of a crash."""
    from dataclasses import replace

    from .deploy.expected import ExpectedTensors

    c = ref.config
    heads = int(c["num_attention_heads"])
    shape = replace(
        ws.model, head_num=heads, kv_head_num=int(c.get("num_key_value_heads", heads)),
        size_per_head=int(c.get("head_dim") or c["hidden_size"] // heads), hidden_units=int(c["hidden_size"]),
        num_layer=int(c["num_hidden_layers"]), vocab_size=int(c["vocab_size"]),
    )
    return ExpectedTensors(ref.xcomposer2_state_dict(), shape)


def _cases(opts: RunOptions) -> list[CanonicalInput]:
    if opts.cases:
        return list(opts.cases)
    if opts.inputs:
        return load_cases(opts.inputs)
    from .fixtures import IMAGES_DIR

    images = sorted(Path(IMAGES_DIR).glob("*.png"))
    if not images:
        raise ParityInputError(f"No default test image found in {IMAGES_DIR}; pass --inputs FILE.")
    return default_cases(images[0])


def _summary(p: PreparedInput, hf_hash: str, eng_hash: str, masks: dict[str, list[int]]) -> CaseSummary:
    return CaseSummary(
        name=p.name, rows=len(p.token_ids), bos_policy=p.bos_policy, image_spans=[tuple(r) for r in p.ranges],
        bos_rows=[i for i, b in enumerate(p.bos_rows.tolist()) if b], row_labels=p.row_labels,
        hashes={"hf": hf_hash, "engine": eng_hash}, masks=masks,
    )


def _conversion_findings(record) -> list[Finding]:
    if record is None:
        return []
    return [Finding(check="config", severity="warning", cause="config_mismatch", message=w) for w in record.warnings]


def _engine_refused(e: Exception, case: str) -> Finding:
    return Finding(check="engine", severity="error", cause="shape_mismatch", case=case,
                   message=f"The engine refused to load the workspace, as TurboMind would at start-up: {e}")


def runtime_semantics(opts: RunOptions):
    """The runtime semantics the run replays, after the option checks that need no model (exit 2 early)."""
    from .deploy.compat import installed_lmdeploy_version
    from .deploy.versions import semantics_for_run

    version = opts.lmdeploy_version or installed_lmdeploy_version()
    if version is None:
        raise ParityInputError("lmdeploy is not installed and no --lmdeploy-version was given; run `make setup`.")
    semantics = semantics_for_run(version)  # 0.9.2-0.13.0 cannot deploy PLoRA: exit 2, nothing to compare
    if opts.numeric not in ("fp32", "emulate"):
        raise ParityInputError(f"--numeric must be 'fp32' or 'emulate', got {opts.numeric!r}.")
    return semantics


def workspace_path(opts: RunOptions, family: str | None) -> Path:
    """The workspace the run compares against: the given one, else the cached conversion of the model (for a
    Qwen2 PLoRA original, of its XComposer2 disguise)."""
    if opts.workspace is not None:
        return opts.workspace
    if family == "qwen2-plora":
        from .disguise import disguised_workspace

        return disguised_workspace(opts.model, opts.cache_dir, trust_remote_code=opts.trust_remote_code)[0]
    from .deploy.convert import convert_cached

    return convert_cached(opts.model, opts.cache_dir / "workspaces")


def run_parity(opts: RunOptions) -> Report:
    """One parity run. With `opts.session`, reference captures are reused across runs."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    semantics = runtime_semantics(opts)
    live = opts.engine == "turbomind"
    if opts.layers not in (None, "every", "bisect"):
        raise ParityInputError(f"--layers must be 'every' or 'bisect', got {opts.layers!r}.")
    if opts.layers and not live:
        raise ParityInputError("--layers needs --engine turbomind: the replay engine records every layer already.")
    if opts.layers and opts.serve_from == "workspace":
        # the truncated copies are deployed from the HF folder (with LoRA), the full model from the workspace
        # (without): per-layer values would mix two deployments and bisect to the wrong layer
        raise ParityInputError(
            "--layers cannot be combined with --serve-from workspace: the per-layer values come from truncated "
            "copies of the HF folder (served with their LoRA), while a workspace-served TurboMind runs without "
            "LoRA, so the layers would compare two different deployments. Run --layers with --serve-from hf, or "
            "--serve-from workspace without --layers.")
    if live:  # fail before any work when TurboMind cannot run here (EngineUnavailable: exit 2, one paragraph)
        from .deploy.live import available, unavailable_error

        ok, reason = available()
        if not ok:
            raise unavailable_error(reason)
    placement = resolve_device(opts.device)  # exit 2 for --device cuda without CUDA, before any work
    if opts.original is not None:
        from .quant.report import check_original

        check_original(opts.model, opts.original)  # exit 2 before any model loads
    cases = _cases(opts)  # a bad inputs file fails before any model is loaded
    session = opts.session or ReferenceSession(opts.model, opts.trust_remote_code, low_memory=opts.low_memory,
                                               all_parts=opts.keep_traces is not None, placement=placement)
    try:
        with judged_precision():  # judged float32 is float32 on a GPU too (TF32 off; parity.device)
            return _run_in_session(opts, session, semantics, cases, live, t0, timings)
    finally:
        if opts.session is None:
            session.close()


def _run_in_session(opts: RunOptions, session: ReferenceSession, semantics, cases: list[CanonicalInput],
                    live: bool, t0: float, timings: dict[str, float]) -> Report:
    from .deploy.workspace import Workspace
    from .trace import TraceMeta, TraceWriter

    ref = session.ref
    # The PLoRA parts no check reads are not written (all are kept with --keep-traces, for debugging): the
    # checks read the parts of the teacher-forced run (the end-to-end run's only where there is no other), and
    # emulate mode judges the engine's LoRA delta on the engine's own input, so it keeps ":input"
    local_skip = frozenset({"base"}) if (opts.numeric == "emulate" and not live) else _UNREAD_PARTS
    timings["load_reference"] = time.perf_counter() - t0

    t = time.perf_counter()
    ws = Workspace.open(workspace_path(opts, ref.family))
    timings["convert"] = time.perf_counter() - t
    engine = _engine(opts, ws, semantics, session.placement.device)
    # the live engine computes in its weight dtype: judge it at that precision (floor = reference in that dtype)
    numeric = "emulate" if live else opts.numeric
    floor_dtype = _float64_floor(session.placement) if numeric == "fp32" else (
        {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(engine.weight_type, ws.dtype) if live else ws.dtype)
    live_cases = []
    engine_section: dict[str, Any] = {}

    case_traces: list[CaseTraces] = []
    summaries: list[CaseSummary] = []
    work = Path(tempfile.mkdtemp(prefix="parity-engine-"))
    try:
        findings: list[Finding] = _conversion_findings(ws.conversion_record())
        for case in cases:
            prepared = prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
            hf_p = opts.mutate_hf_prepared(prepared) if opts.mutate_hf_prepared else prepared
            eng_p = opts.mutate_engine_prepared(prepared) if opts.mutate_engine_prepared else prepared
            hcall, ecall = hf_call(hf_p), engine_call(eng_p)
            if opts.mutate_engine_call:
                ecall = opts.mutate_engine_call(case.name, ecall)
            t = time.perf_counter()
            reference = session.reference(hcall, case.name)
            # live: the engine's values are end to end, so their floor is the end-to-end floor (as values);
            # replay: only the teacher-forced floor's error statistics are needed
            floor_e2e = session.floor_e2e(hcall, case.name, floor_dtype) if live else None
            floor_local = floor_e2e if live else session.floor_local(hcall, case.name, floor_dtype)
            timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            d = work / case.name

            def writer(name: str, skip: frozenset[str]) -> TraceWriter:
                return TraceWriter(d / name, TraceMeta(side=opts.engine, case=case.name,
                                                       num_layers=ws.model.num_layer, dtype=str(ws.dtype)),
                                   skip_parts=frozenset() if opts.keep_traces else skip)
            try:
                # Teacher forcing needs the same rows on both sides; with different rows (a BOS policy or
                # range mismatch) only the engine's own run exists and the inputs check names the difference.
                # A live TurboMind cannot be teacher-forced: end to end only.
                same_rows = len(ecall.input_ids) == hf_p.image_rows.numel()
                if same_rows and not live:  # both runs in one layer-major pass over the weights
                    engine_info, local_info = engine.run_pair(
                        ecall, writer("engine", _PLORA_PARTS), writer("engine_local", local_skip), reference)
                else:
                    engine_info = local_info = engine.run(ecall, writer("engine", _UNREAD_PARTS))
                engine_trace, local_trace = engine_info["trace"], local_info["trace"]
            except EngineRefused as e:  # TurboMind refuses such a workspace at load time (LoRA byte sizes)
                findings.append(_engine_refused(e, case.name))
                continue
            finally:
                timings["engine"] = timings.get("engine", 0.0) + time.perf_counter() - t
            asked_rows, asked_mask = engine_rows(ecall, ref.embed_tokens)
            if live and same_rows:
                from .layerwise import PipelineCase

                live_cases.append(PipelineCase(hf_p, hcall, ecall, reference, floor_e2e,
                                               engine_trace.get(None, "norm")))
            ct = CaseTraces(hf_p, reference, floor_e2e, floor_local, engine_trace, local_trace,
                            engine_info, asked_rows, asked_mask)
            case_traces.append(ct)
            summaries.append(_summary(hf_p, hcall.content_hash, ecall.content_hash,
                                      {k: v.tolist() for k, v in mask_check.masks_for(ct).items()}))

        layerwise_section = None
        if live:
            findings += engine.warning_findings()
            engine_section = engine.info()
            engine.close()  # free the GPU before deploying truncated copies
            if opts.layers and live_cases:
                from .deploy.live import live_factory
                from .layerwise import run_layers

                t = time.perf_counter()
                found, layerwise_section = run_layers(
                    opts.layers, opts.model, opts.cache_dir, session, live_cases, numeric, floor_dtype,
                    opts.thresholds, live_factory(**opts.live))
                findings += found
                timings["layers"] = time.perf_counter() - t
        t = time.perf_counter()
        points = []
        for ct in case_traces:
            points += compare_case(ct, opts.thresholds, numeric)
        ctx = CheckContext(
            hf_config=ref.config, hf_plora=_hf_plora(ref), hf_tm_tensors=_hf_tm_tensors(ref, ws), workspace=ws,
            semantics=semantics, serve_from=opts.serve_from, cases=case_traces, points=points,
            thresholds=opts.thresholds, numeric=numeric,
        )
        outputs = {}
        for name, check in (("inputs", inputs_check), ("config", config_check), ("weights", weights_check),
                            ("mask", mask_check), ("plora", plora_check), ("nonfinite", nonfinite_check)):
            outputs[name] = check.run(ctx)
            findings += outputs[name].findings
        findings += hidden_check.run(ctx, findings).findings
        quantization: dict[str, Any] = {}
        if opts.original is not None:  # what quantization did to the original (smoothing vs PLoRA, cost)
            from .quant.report import quantization_section

            found, quantization = quantization_section(opts.model, opts.original, [ct.prepared for ct in case_traces],
                                                       opts.trust_remote_code)
            findings += found
        names = [c.name for c in cases]
        status, first = decide(findings, ref.anatomy.num_layers, names)
        findings = sort_findings(findings, ref.anatomy.num_layers, names)
        timings["compare"] = time.perf_counter() - t
        if opts.keep_traces:
            shutil.copytree(work, opts.keep_traces / "engine", dirs_exist_ok=True)
            shutil.copytree(session.root, opts.keep_traces / "reference", dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    record = ws.conversion_record()
    engine_dict = {"kind": opts.engine, "lmdeploy_version": semantics.version, "numeric": numeric,
                   "serve_from": opts.serve_from, "semantics": semantics.__dict__,
                   "weight_type": ws.model.weight_type, "sub_type": record.sub_type if record else None,
                   "reference_storage": str(next(ref.model.parameters()).dtype).replace("torch.", ""),
                   "conversion_warnings": record.warnings if record else [],
                   "device": session.placement.describe(),
                   "reference_applied": ref.applied}
    if live:
        engine_dict.update(engine_section)  # lmdeploy version, GPU, dtype, lora_config as loaded
        if layerwise_section is not None:
            engine_dict["layerwise"] = layerwise_section
    return Report(
        status=status,
        engine=engine_dict,
        model=str(opts.model), workspace=str(ws.root), findings=findings, first_divergence=first, points=points,
        cases=summaries, config_audit=outputs["config"].table, weights_audit=outputs["weights"].table,
        plora_table=outputs["plora"].table, thresholds=opts.thresholds.to_dict(), timings=timings,
        parity_version=__version__, quantization=quantization,
    )
