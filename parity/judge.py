"""The judging of a run, after the deployment stage: each case's traces aligned and compared (parity.compare),
the checks (parity.checks.registry), what quantization did and what the quantized KV cache costs
(parity.quant.report), the decode check, then the verdict (parity.verdict): status, first divergence, the
findings in order and grouped by root cause."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks.base import CheckContext, hf_plora_of
from .checks.mask import masks_for
from .checks.registry import refused_finding, run_checks, warning_findings
from .compare.align import CaseTraces, compare_case
from .deploy.expected import ExpectedTensors
from .inputs import engine_rows
from .options import RunOptions
from .records import (CaseSummary, DecodeSection, DeployedCase, Divergence, EngineSummary, EngineWarning, Finding,
                      FindingGroup, PointResult, RuntimeSemantics)
from .verdict import decide, group_findings, sort_findings


@dataclass
class Judgement:
    """What the report shows of the judging: each field is the `parity.records.Report` field of its name."""

    status: str
    first_divergence: Divergence | None
    findings: list[Finding]
    groups: list[FindingGroup]
    points: list[PointResult]
    cases: list[CaseSummary]
    config_audit: list[dict[str, Any]]
    weights_audit: list[dict[str, Any]]
    plora_table: list[dict[str, Any]]
    quantization: dict[str, Any] = field(default_factory=dict)
    decode: list[DecodeSection] = field(default_factory=list)


def case_traces(deployed: DeployedCase, ref) -> CaseTraces:
    """Everything captured for one case, as the comparison and the checks read it; the rows the engine call
    asked for are looked up in the reference's own embedding table (`ref`: `reference.loader.ReferenceModel`)."""
    run, captured = deployed.run, deployed.captured
    asked_rows, asked_mask = engine_rows(deployed.case.engine_call, ref.embed_tokens)
    return CaseTraces(deployed.case.prepared, captured.reference, captured.floor_e2e, captured.floor_local,
                      run.trace, run.local, run, asked_rows, asked_mask)


def judge(opts: RunOptions, ref, workspace, semantics: RuntimeSemantics, numeric: str,
          deployed: list[DeployedCase], summary: EngineSummary, image_findings: list[Finding]) -> Judgement:
    """`numeric`: the precision the engine is judged at (`EngineSettings.numeric`); `ref`: the reference model;
    `workspace`: the deployment's. Findings come in a fixed order before the verdict sorts them: the conversion's
    warnings, the engine's refusals, its warnings and follow-up findings, the image path's, then the checks'."""
    ran = [d for d in deployed if d.run is not None]
    traces = [case_traces(d, ref) for d in ran]
    points = [p for ct in traces for p in compare_case(ct, opts.thresholds, numeric)]
    ctx = CheckContext(
        hf_config=ref.config, hf_plora=hf_plora_of(ref.anatomy.linears),
        hf_tm_tensors=ExpectedTensors.from_hf_config(ref.config, ref.xcomposer2_state_dict(), workspace.model),
        workspace=workspace, semantics=semantics, serve_from=opts.serve_from, cases=traces, points=points,
        thresholds=opts.thresholds, numeric=numeric, model=opts.model,
    )
    record = workspace.conversion_record()
    conversion = [EngineWarning(cause="config_mismatch", message=w) for w in (record.warnings if record else [])]
    refused = [refused_finding(d.refused, d.case.name) for d in deployed if d.refused is not None]
    prior = (warning_findings(conversion) + refused + warning_findings(summary.warnings) + summary.findings
             + image_findings)
    outputs, findings = run_checks(ctx, prior)
    quantization: dict[str, Any] = {}
    if opts.original is not None:  # what quantization did to the original (smoothing vs PLoRA, cost)
        from .quant.report import quantization_section

        found, quantization = quantization_section(opts.model, opts.original, [ct.prepared for ct in traces],
                                                   opts.trust_remote_code)
        findings += found
    if opts.quant_policy:  # what the quantized KV cache costs, against its budget
        from .quant.report import kv_cache_section

        found, quantization["kv_cache"] = kv_cache_section(ref, [ct.prepared for ct in traces], opts.quant_policy,
                                                           workspace.dtype)
        findings += found
    names = [d.case.name for d in deployed]
    decoded = [d.decode for d in ran if d.decode is not None]
    if decoded:
        from .checks import decode as decode_check

        _, prefill_first = decide(findings, ref.anatomy.num_layers, names)
        findings += decode_check.run(decoded, prefill_first, opts.thresholds.floor_factor).findings
    status, first = decide(findings, ref.anatomy.num_layers, names)
    findings = sort_findings(findings, ref.anatomy.num_layers, names)
    summaries = [CaseSummary.of(ct.prepared, {"hf": d.case.hf_call.content_hash,
                                              "engine": d.case.engine_call.content_hash},
                                {k: v.tolist() for k, v in masks_for(ct).items()}) for d, ct in zip(ran, traces)]
    return Judgement(status=status, first_divergence=first, findings=findings, groups=group_findings(findings),
                     points=points, cases=summaries, config_audit=outputs["source"].table + outputs["config"].table,
                     weights_audit=outputs["weights"].table, plora_table=outputs["plora"].table,
                     quantization=quantization, decode=decoded)
