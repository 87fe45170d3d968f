"""The straight line: inputs -> reference capture -> deployment (an Engine) -> align -> checks -> verdict -> report.

`run_parity` is the one entry point the CLI, the pytest plugin and the fault catalogue share. Each stage
takes and returns records; this module only orders them. It never asks which engine it drives: what differs
between engines is in their `EngineSettings` or inside them (parity.engines).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import progress
from .version import __version__
from .checks.base import CheckContext, hf_plora_of
from .checks.mask import masks_for
from .checks.registry import refused_finding, run_checks, warning_findings
from .compare.align import CaseTraces, compare_case
from .compare.stream import FloorOnDemand
from .deploy.expected import ExpectedTensors
from .deploy.image_input import ImagePath
from .deploy.layout import stored_weights_dtype
from .device import check_floor_device, judged_precision
from .engines import EngineSetup, engine_class
from .errors import EngineRefused
from .inputs import engine_call, engine_rows, hf_call
from .options import RunOptions, check_options, run_cases, workspace_path
from .progress import timed
from .records import (CanonicalInput, CaseSummary, DecodeSection, EngineRequest, EngineWarning, FaultHooks, Finding,
                      Report)
from .reference.session import ReferenceSession
from .resources import check_resources
from .verdict import decide, group_findings, sort_findings


def run_parity(opts: RunOptions, faults: FaultHooks | None = None) -> Report:
    """One parity run. With `opts.session`, reference captures are reused across runs; `faults` are the fault
    catalogue's injections (none in a user's run)."""
    faults = faults or FaultHooks()
    t0 = time.perf_counter()
    semantics, placement = check_options(opts)  # exit 2 before any model loads
    cases = run_cases(opts)  # a bad inputs file fails before any model is loaded
    with progress.stage("load reference", str(opts.model)):
        session = opts.session or ReferenceSession(opts.model, opts.trust_remote_code, low_memory=opts.low_memory,
                                                   all_parts=opts.keep_traces is not None, placement=placement)
    work = Path(tempfile.mkdtemp(prefix="parity-engine-"))
    try:
        with judged_precision():  # judged float32 is float32 on a GPU too (TF32 off; parity.device)
            return _run_stages(opts, faults, session, semantics, cases, work,
                               {"load_reference": time.perf_counter() - t0}, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if opts.session is None:
            session.close()


def _run_stages(opts: RunOptions, faults: FaultHooks, session: ReferenceSession, semantics,
                cases: list[CanonicalInput], work: Path,
                timings: dict[str, float], t0: float) -> Report:
    from .deploy.workspace import Workspace

    with timed(timings, "convert"):
        ws = Workspace.open(workspace_path(opts, session.loaded.family))
    # judged with the weights the deployment holds (the weights check compares them with the checkpoint)
    session.hold_weights_as(stored_weights_dtype(ws.model.weight_type))
    ref = session.ref
    record = ws.conversion_record()
    warnings = [EngineWarning(cause="config_mismatch", message=w) for w in (record.warnings if record else [])]
    options = dict(opts.live)
    if opts.quant_policy:  # the reference reads K and V back from the same quantized cache as the deployment
        from .quant.kv import bits_for_policy
        from .quant.kv_reference import turbomind_kv

        session.kv_cache = turbomind_kv(bits_for_policy(opts.quant_policy), ws.dtype)
        options.update(kv_bits=bits_for_policy(opts.quant_policy))
    engine = engine_class(opts.engine)(EngineSetup(
        model=opts.model, workspace=ws, semantics=semantics, numeric=opts.numeric, serve_from=opts.serve_from,
        options=options, layers=opts.layers, cache_dir=opts.cache_dir, thresholds=opts.thresholds,
        session=session, device=session.placement.device, faults=faults,
        teacher_forced_everywhere=opts.teacher_forced_everywhere))
    try:
        settings = engine.activate()
        check_floor_device(session.placement, settings.floor_dtype)
        refused: list[Finding] = []
        case_traces: list[CaseTraces] = []
        summaries: list[CaseSummary] = []
        decode_sections: list[DecodeSection] = []
        # every case laid out first: the resource guard judges their row counts before any capture starts
        images = ImagePath(opts.model, ref, ws, opts.thresholds.image_feature_rel, faults.lmdeploy_vision_fault)
        laid_out = [images.prepare(case) for case in cases]
        image_findings: list[Finding] = [f for _, _, found in laid_out for f in found]
        if opts.resource_check:
            rows = [(p.name, len(p.token_ids) + opts.decode) for p, _, _ in laid_out]  # prompt + generated
            check_resources(ref.config, rows, scratch=work, model=str(opts.model),
                            floor_bytes=torch.empty((), dtype=settings.floor_dtype).element_size())
        for case, (prepared, eng_prepared, _) in zip(cases, laid_out):
            hf_p = faults.mutate_hf_prepared(prepared) if faults.mutate_hf_prepared else prepared
            eng_p = faults.mutate_engine_prepared(eng_prepared) if faults.mutate_engine_prepared else eng_prepared
            hcall, ecall = hf_call(hf_p), engine_call(eng_p)
            if faults.mutate_engine_call:
                ecall = faults.mutate_engine_call(case.name, ecall)
            with timed(timings, "reference", case.name):
                reference = session.reference(hcall, case.name)
                floor_e2e, floor_local = session.floors(hcall, case.name, settings.floor_dtype,
                                                        settings.teacher_forced)
                if opts.measure_floor and isinstance(floor_local, FloorOnDemand):
                    floor_local.resolve()  # else measured on demand, only where a verdict needs it
            # teacher forcing needs the same rows on both sides; with different rows (a BOS policy or range
            # mismatch) only the engine's own run exists and the inputs check names the difference
            same_rows = len(ecall.input_ids) == hf_p.image_rows.numel()
            request = EngineRequest(case.name, ecall, hf_p, hcall, reference, floor_e2e, same_rows,
                                    work / case.name, keep_all_parts=opts.keep_traces is not None)
            try:
                with timed(timings, "engine", case.name):
                    run = engine.infer(request)
            except EngineRefused as e:  # TurboMind refuses such a workspace at load time (LoRA byte sizes)
                refused.append(refused_finding(e, case.name))
                continue
            if opts.decode and same_rows:  # generated tokens: free-running and teacher-forced (issue 18)
                from .generation import decode_case

                with timed(timings, "decode", case.name):
                    decode_sections.append(decode_case(session, engine, request, opts.decode, opts.thresholds,
                                                       settings))
            asked_rows, asked_mask = engine_rows(ecall, ref.embed_tokens)
            ct = CaseTraces(hf_p, reference, floor_e2e, floor_local, run.trace, run.local, run, asked_rows, asked_mask)
            case_traces.append(ct)
            summaries.append(CaseSummary.of(hf_p, {"hf": hcall.content_hash, "engine": ecall.content_hash},
                                            {k: v.tolist() for k, v in masks_for(ct).items()}))
        summary = engine.deactivate()  # a follow-up strategy (live per-layer runs) runs here
    finally:
        engine.close()
    timings.update(summary.timings)
    with timed(timings, "compare"):
        points = [p for ct in case_traces for p in compare_case(ct, opts.thresholds, settings.numeric)]
        ctx = CheckContext(
            hf_config=ref.config, hf_plora=hf_plora_of(ref.anatomy.linears),
            hf_tm_tensors=ExpectedTensors.from_hf_config(ref.config, ref.xcomposer2_state_dict(), ws.model), workspace=ws,
            semantics=semantics, serve_from=opts.serve_from, cases=case_traces, points=points,
            thresholds=opts.thresholds, numeric=settings.numeric, model=opts.model,
        )
        prior = (warning_findings(warnings) + refused + warning_findings(summary.warnings) + summary.findings
                 + image_findings)
        outputs, findings = run_checks(ctx, prior)
        quantization: dict[str, Any] = {}
        if opts.original is not None:  # what quantization did to the original (smoothing vs PLoRA, cost)
            from .quant.report import quantization_section

            found, quantization = quantization_section(opts.model, opts.original, [ct.prepared for ct in case_traces],
                                                       opts.trust_remote_code)
            findings += found
        if opts.quant_policy:  # what the quantized KV cache costs, against its budget
            from .quant.report import kv_cache_section

            found, quantization["kv_cache"] = kv_cache_section(ref, [ct.prepared for ct in case_traces],
                                                               opts.quant_policy, ws.dtype)
            findings += found
        names = [c.name for c in cases]
        if decode_sections:
            from .checks import decode as decode_check

            _, prefill_first = decide(findings, ref.anatomy.num_layers, names)
            findings += decode_check.run(decode_sections, prefill_first, opts.thresholds.floor_factor).findings
        status, first = decide(findings, ref.anatomy.num_layers, names)
        findings = sort_findings(findings, ref.anatomy.num_layers, names)
    if opts.keep_traces:
        shutil.copytree(work, opts.keep_traces / "engine", dirs_exist_ok=True)
        shutil.copytree(session.root, opts.keep_traces / "reference", dirs_exist_ok=True)
    timings["total"] = time.perf_counter() - t0
    engine_section = {"kind": opts.engine, "lmdeploy_version": semantics.version, "numeric": settings.numeric,
                      "serve_from": opts.serve_from, "semantics": semantics.__dict__,
                      "weight_type": ws.model.weight_type, "sub_type": record.sub_type if record else None,
                      "reference_storage": str(next(ref.model.parameters()).dtype).replace("torch.", ""),
                      "reference_weights": ref.weights_note(ws.model.weight_type),
                      "conversion_warnings": record.warnings if record else [],
                      "device": session.placement.describe(), "reference_applied": ref.applied, **summary.report}
    if images.section:
        engine_section["image_input"] = images.section
    return Report(
        status=status, engine=engine_section, model=str(opts.model), workspace=str(ws.root), findings=findings,
        first_divergence=first, points=points, cases=summaries,
        config_audit=outputs["source"].table + outputs["config"].table,
        weights_audit=outputs["weights"].table, plora_table=outputs["plora"].table,
        thresholds=opts.thresholds.to_dict(), timings=timings, parity_version=__version__,
        quantization=quantization, decode=decode_sections, groups=group_findings(findings),
    )
