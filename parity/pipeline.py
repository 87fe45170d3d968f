"""The straight line: inputs -> reference capture -> deployment (an Engine) -> align -> checks -> verdict -> report.

`run_parity` is the one entry point the CLI, the pytest plugin and the fault catalogue share. Each stage
takes and returns records; this module only orders them. It never asks which engine it drives: what differs
between engines is in their `EngineSettings` or inside them (parity.engines).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import progress
from .version import __version__
from .checks.base import CheckContext
from .checks.mask import masks_for
from .checks.registry import run_checks, warning_findings
from .compare.align import CaseTraces, compare_case
from .compare.stream import FloorOnDemand
from .compare.thresholds import Thresholds
from .deploy.layout import stored_weights_dtype
from .device import Placement, judged_precision, resolve_device, supports_float64
from .engines import EngineSetup, engine_class
from .errors import EngineRefused, ParityInputError
from .hfconfig import head_dim_of, kv_heads_of
from .inputs import default_cases, engine_call, engine_rows, hf_call, load_cases, prepare
from .places import default_cache_dir
from .resources import check_resources
from .records import (CanonicalInput, CaseSummary, DecodeSection, EngineRequest, EngineWarning, FaultHooks, Finding,
                      PreparedInput, Report)
from .reference.loader import ReferenceModel
from .reference.session import ReferenceSession
from .verdict import decide, group_findings, sort_findings


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
    measure_floor: bool = False                      # measure the noise floor even where no verdict needs it
    teacher_forced_everywhere: bool = False          # replay teacher-forced at every layer (parity.compare.gate)
    original: Path | None = None                     # a quantized model's original: smoothing check, cost report
    decode: int = 0                                  # generated tokens to compare after the prefill (0: none)
    resource_check: bool = True                      # refuse a run that cannot fit (parity.resources)
    quant_policy: int = 0                            # TurboMind's KV cache: 0 fp, 8 u8, 4 u4 (parity.quant.kv)


def _check_floor_device(placement: Placement, floor_dtype: torch.dtype) -> None:
    """The fp32 mode's noise floor runs in float64; a device without it cannot judge float32 (exit 2)."""
    if floor_dtype == torch.float64 and not supports_float64(placement.device):
        raise ParityInputError(f"--device {placement.spec}: {placement.device.type} has no float64, which the "
                               "fp32 mode's noise floor needs; use --device cpu or a CUDA GPU.")


def _hf_plora(ref: ReferenceModel) -> dict[int, dict[str, dict[str, Any]]]:
    return {
        i: {p: {"rank": lin.rank, "scale": lin.scale, "has_bias": lin.module.bias is not None}
            for p, lin in lins.items()}
        for i, lins in ref.anatomy.linears.items()
    }


def _hf_tm_tensors(ref: ReferenceModel, ws):
    """The HF weights as a faithful conversion would write them. Shaped by the HF config (the truth), so a
    wrong head count in config.yaml shows up as a difference instead of a crash."""
    from .deploy.expected import ExpectedTensors

    c = ref.config
    shape = replace(
        ws.model, head_num=int(c["num_attention_heads"]), kv_head_num=kv_heads_of(c), size_per_head=head_dim_of(c),
        hidden_units=int(c["hidden_size"]), num_layer=int(c["num_hidden_layers"]), vocab_size=int(c["vocab_size"]),
        inter_size=ws.model.inter_size if len(ws.model.inter_size) == int(c["num_hidden_layers"])
        else [int(c["intermediate_size"])] * int(c["num_hidden_layers"]),  # a workspace of another depth
    )
    return ExpectedTensors(ref.xcomposer2_state_dict(), shape)


def run_cases(opts: RunOptions) -> list[CanonicalInput]:
    """The run's input cases: given programmatically, from the inputs file, or the default image's."""
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


def _engine_refused(e: Exception, case: str) -> Finding:
    return Finding(check="engine", severity="error", cause="shape_mismatch", case=case,
                   message=f"The engine refused to load the workspace, as TurboMind would at start-up: {e}")


class _ImagePath:
    """Both sides' image rows for each case. For the 4KHD / 2.5 sub-types (either side's), the engine's come
    from lmdeploy's own image path (`parity.deploy.image_input`) and are compared with the HF side's; the
    engine is then given the HF features wherever an image's row count agrees, so the layer checks judge
    the layers, and the input findings the image path."""

    def __init__(self, opts: RunOptions, ref: ReferenceModel, ws, vision_fault=None):
        from .deploy import image_input

        self.ref, self.allowance = ref, opts.thresholds.image_feature_rel
        self.hf_sub = image_input.hf_sub_type(opts.model) if ref.family == "xcomposer2" else "7b"
        record = ws.conversion_record()
        hd = ("4khd", "2.5")
        self.vision = (image_input.LmdeployVision(opts.model, vision_fault)
                       if ref.family == "xcomposer2" and (self.hf_sub in hd or (record and record.sub_type in hd))
                       else None)
        self.section: dict[str, Any] = {}

    def prepare(self, case: CanonicalInput) -> tuple[PreparedInput, PreparedInput, list[Finding]]:
        from dataclasses import replace

        from .deploy import image_input

        ref = self.ref
        hf_case = replace(case, segments=image_input.hf_chat_segments(case.chat, self.hf_sub)) if case.chat else case
        prepared = prepare(hf_case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
        if self.vision is None:
            return prepared, prepared, []
        try:
            eng_case = replace(case, segments=self.vision.chat_segments(case.chat)) if case.chat else hf_case
            paths = [s.image for s in eng_case.segments if s.kind == "image"]
            lm = [self.vision.encode(p, len(paths)) for p in paths]
        except image_input.VisionFailed as e:
            return prepared, prepared, [image_input.vision_failed(case.name, self.hf_sub, self.vision.sub_type, e)]
        # the HF features where the row counts agree (compare_images judges the difference), else lmdeploy's
        feats = iter([hf if hf.shape[0] == img.features.shape[0] else img.features
                      for hf, img in zip(prepared.image_features, lm)])
        eng = prepare(eng_case, ref.tokenize, ref.embed_tokens, lambda _: next(feats), ref.bos_id, ref.decode)
        found, table = image_input.compare_images(case.name, prepared, lm, self.allowance, self.hf_sub)
        self.section = {"sub_type_hf": self.hf_sub, "sub_type_lmdeploy": self.vision.sub_type,
                        "applied": list(self.vision.applied), "images": self.section.get("images", []) + table}
        return prepared, eng, found


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


MAX_DECODE = 4096


def _check_decode(opts: RunOptions) -> None:
    n = opts.decode
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > MAX_DECODE:
        raise ParityInputError(f"--decode must be an integer from 0 to {MAX_DECODE} (generated tokens to compare), "
                               f"got {n!r}.")
    if n and not hasattr(engine_class(opts.engine), "decode"):
        raise ParityInputError(f"--decode needs an engine that decodes (--engine replay); --engine {opts.engine} "
                               "does not report its generated tokens' values yet.")


@contextmanager
def _timed(timings: dict[str, float], stage: str, detail: str = ""):
    t = time.perf_counter()
    try:
        with progress.stage(stage, detail):
            yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t


def run_parity(opts: RunOptions, faults: FaultHooks | None = None) -> Report:
    """One parity run. With `opts.session`, reference captures are reused across runs; `faults` are the fault
    catalogue's injections (none in a user's run)."""
    faults = faults or FaultHooks()
    t0 = time.perf_counter()
    semantics = runtime_semantics(opts)
    if opts.layers not in (None, "every", "bisect"):
        raise ParityInputError(f"--layers must be 'every' or 'bisect', got {opts.layers!r}.")
    if opts.quant_policy not in (0, 4, 8):
        raise ParityInputError(f"--quant-policy must be 0, 4 or 8 (TurboMind's KV cache: fp, u4, u8), got "
                               f"{opts.quant_policy!r}.")
    if opts.quant_policy and opts.engine != "replay":
        raise ParityInputError("--quant-policy is emulated by the replay engine; passing it to a live TurboMind is not "
                               "wired in parity yet. Run it with --engine replay.")
    engine_class(opts.engine).preflight(opts.layers, opts.serve_from)  # e.g. no TurboMind here: exit 2 before any work
    _check_decode(opts)
    placement = resolve_device(opts.device)  # exit 2 for --device cuda without CUDA, before any work
    if opts.quant_policy and opts.session is not None:
        raise ValueError("a shared ReferenceSession holds captures without the quantized KV cache; run --quant-policy "
                         "with a session of its own")
    if opts.original is not None:
        from .quant.report import check_original

        check_original(opts.model, opts.original)  # exit 2 before any model loads
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


def _weights_note(ref: ReferenceModel, ws) -> str:
    """How the reference held its weights for this run (report.json engine.reference_weights)."""
    if ref.weights_dtype is None:
        return f"as stored in the checkpoint (the workspace's {ws.model.weight_type} weights hold the same values)"
    return (f"rounded to {str(ref.weights_dtype).replace('torch.', '')}, the dtype the workspace stores them in "
            "(the checkpoint holds other dtypes; lmdeploy 0.7.1 writes no float32 weights); the weights check "
            "compares the workspace with the checkpoint the same way")


def _run_stages(opts: RunOptions, faults: FaultHooks, session: ReferenceSession, semantics,
                cases: list[CanonicalInput], work: Path,
                timings: dict[str, float], t0: float) -> Report:
    from .deploy.workspace import Workspace

    with _timed(timings, "convert"):
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
        _check_floor_device(session.placement, settings.floor_dtype)
        refused: list[Finding] = []
        case_traces: list[CaseTraces] = []
        summaries: list[CaseSummary] = []
        decode_sections: list[DecodeSection] = []
        # every case laid out first: the resource guard judges their row counts before any capture starts
        images = _ImagePath(opts, ref, ws, faults.lmdeploy_vision_fault)
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
            with _timed(timings, "reference", case.name):
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
                with _timed(timings, "engine", case.name):
                    run = engine.infer(request)
            except EngineRefused as e:  # TurboMind refuses such a workspace at load time (LoRA byte sizes)
                refused.append(_engine_refused(e, case.name))
                continue
            if opts.decode and same_rows:  # generated tokens: free-running and teacher-forced (issue 18)
                from .generation import decode_case

                with _timed(timings, "decode", case.name):
                    decode_sections.append(decode_case(session, engine, request, opts.decode, opts.thresholds,
                                                       settings))
            asked_rows, asked_mask = engine_rows(ecall, ref.embed_tokens)
            ct = CaseTraces(hf_p, reference, floor_e2e, floor_local, run.trace, run.local, run, asked_rows, asked_mask)
            case_traces.append(ct)
            summaries.append(_summary(hf_p, hcall.content_hash, ecall.content_hash,
                                      {k: v.tolist() for k, v in masks_for(ct).items()}))
        summary = engine.deactivate()  # a follow-up strategy (live per-layer runs) runs here
    finally:
        engine.close()
    timings.update(summary.timings)
    with _timed(timings, "compare"):
        points = [p for ct in case_traces for p in compare_case(ct, opts.thresholds, settings.numeric)]
        ctx = CheckContext(
            hf_config=ref.config, hf_plora=_hf_plora(ref), hf_tm_tensors=_hf_tm_tensors(ref, ws), workspace=ws,
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
                      "reference_weights": _weights_note(ref, ws),
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
