"""The decode stage of one case (`--decode N`), after its prefill comparison:

reference greedy tokens -> reference capture over prompt + tokens (with its noise floors) -> the engine
decoding the same tokens, step by step (`Engine.decode`) -> each step compared as it arrives -> a
`DecodeSection`.
"""

from __future__ import annotations

from .compare.decode import DecodeComparator
from .compare.thresholds import Thresholds
from pathlib import Path

from .records import DecodeSection, DecodeStep, EngineRequest, EngineSettings
from .reference.decode import greedy
from .reference.session import ReferenceSession
from .trace import TraceRows, atomic_save


def decode_case(session: ReferenceSession, engine, request: EngineRequest, n: int, thresholds: Thresholds,
                settings: EngineSettings) -> DecodeSection:
    ref = session.ref
    if session.kv_cache is None:
        gen = greedy(ref, request.hf_call, n)
    else:  # --quant-policy: the reference decodes reading K and V through the same quantized cache
        from .quant.kv_reference import quantized_kv_cache

        with quantized_kv_cache(ref.model, session.kv_cache):
            gen = greedy(ref, request.hf_call, n)
    name = f"{request.case}-decode"
    reference = session.reference(gen.call, name)
    # an engine judged end to end (the live one: no per-layer values) needs no teacher-forced floor
    floor_local = session.floor_local(gen.call, name, settings.floor_dtype) if settings.teacher_forced else None
    floor_e2e = session.floor_e2e(gen.call, name, settings.floor_dtype)
    comparator = DecodeComparator(request.case, gen.tokens, gen.prompt_rows, reference, floor_local, floor_e2e,
                                  thresholds, settings.numeric, ref.decode)
    teacher = TraceRows(reference)
    keep = request.trace_dir / "decode" if request.keep_all_parts else None  # --keep-traces: one file per step
    try:
        for step in engine.decode(request, gen.tokens, teacher):
            comparator.add(step)
            if keep is not None:
                _write_step(keep, step)
    finally:
        teacher.close()
    return comparator.finish(engine.decode_info())


def _write_step(folder: Path, step: DecodeStep) -> None:
    """One decode step's values (`e2e/<layer>/<point>`, `local/...`; layer `-` for embeddings, norm, output)."""
    tensors = {f"{side}/{'-' if layer is None else layer}/{point}": v.contiguous()
               for side, values in (("e2e", step.e2e), ("local", step.local))
               for (layer, point), v in values.items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, folder / f"step_{step.step:05d}.safetensors")
