"""No false alarms on quantized deployments: clean AWQ models of random shapes, quantized by lmdeploy 0.7.1's own
`auto_awq` (`parity quantize`, on CPU) and deployed faithfully, must pass `parity run AWQ --original MODEL`.

One property per fixture family the generator offers (xcomposer2-tiny's 7b, the genuine-shaped vl-7b with its hub
CLIP, 4KHD, XComposer2.5, and a Qwen2 PLoRA model deployed through its XComposer2 disguise). Within a family
hypothesis draws the model (layers, GQA, FFN width, a PLoRA rank and alpha per linear, seed, checkpoint dtype), the
input case (0-1 images, text), `--compensate-plora` on or off, the KV cache (`--quant-policy` 0, 4 or 8), the
numeric mode and a few generated tokens. Weight bits and group size are drawn from what lmdeploy 0.7.1 accepts:
`w_bits` 4 only (`WeightOnlyQLinear.from_linear` asserts `w_bit == 4` for the AWQ layout `auto_awq` saves) and
group size 128 only (`turbomind/deploy/converter.py` `get_tm_model`: "Currently, only 128 is supported" for
`model_format` awq) -- so every drawn width is a multiple of 128.

The property: with `--compensate-plora` the run has zero error findings; without it, its error findings are
exactly the structural `lora_smoothing_mismatch` ones (one per layer and smoothed PLoRA linear: wqkv, w1, w3, w2)
and nothing else -- in particular, no point of the deployment over its threshold (the deployment is faithful to
the quantized model either way). Thresholds stay the defaults. A draw that decodes through a u8/u4 cache in fp32
mode must be refused (exit 2: a decode row is judged at the deployment's precision) and is run in emulate mode.

Deterministic (a fixed seed per family, no example database), sized for CI: `EXAMPLES` examples per family (env
`PARITY_QUANT_EXAMPLES` for a longer search).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from parity.deploy.convert import convert_cached
from parity.errors import ParityInputError
from parity.fixtures import (CLIP_HUB_ID, IMAGES_DIR, QWEN2_PROJECTIONS, FixtureSpec, Qwen2FixtureSpec, hf_home,
                             write_hub_cache, write_model, write_qwen2_model)
from parity.pipeline import RunOptions, run_parity
from parity.points import PLORA_LINEARS
from parity.records import CanonicalInput, Segment

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("PARITY_QUANT_EXAMPLES", "4"))  # per family; the first is the simplest draw
W_BITS = (4,)          # lmdeploy 0.7.1: the AWQ layout packs 4-bit weights only
GROUP_SIZES = (128,)   # lmdeploy 0.7.1's TurboMind converter: awq group size 128 only
WIDTHS = tuple(g * k for g in GROUP_SIZES for k in (1, 2, 3))  # FFN widths holding whole groups
RANKS = (1, 2, 8, 16, 64, 256)
ALPHAS = (0.5, 1.0, 2.0, 16.0, 256.0)
IMAGES = tuple(sorted(Path(IMAGES_DIR).glob("*.png")))
# the linears lmdeploy's smoothing rescales for InternLM2 (NORM_FCS_MAP / FC_FCS_MAP): their PLoRA must follow
SMOOTHED = ("attention.wqkv", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")
FAMILIES = ("7b", "vl", "4khd", "2d5", "qwen2")


@dataclass(frozen=True)
class QuantDraw:
    """One drawn quantized deployment: the model, how it is quantized and how it is run."""

    spec: FixtureSpec | Qwen2FixtureSpec
    w_bits: int
    group_size: int
    compensate_plora: bool
    quant_policy: int
    numeric: str
    decode: int
    case: CanonicalInput


def _lora(draw, names) -> dict[str, tuple[int, float]]:
    return {n: (draw(st.sampled_from(RANKS)), draw(st.sampled_from(ALPHAS))) for n in names}


@st.composite
def xcomposer2_specs(draw, family: str) -> FixtureSpec:
    kv = draw(st.integers(1, 2))
    common = dict(
        name=f"q{family}", layers=draw(st.integers(1, 2)), heads=kv * draw(st.integers(1, 3)), kv_heads=kv,
        head_dim=128, intermediate=draw(st.sampled_from(WIDTHS)), lora=_lora(draw, PLORA_LINEARS),
        seed=draw(st.integers(0, 2**16)), vision_hidden=draw(st.sampled_from((16, 32))), vision_layers=1,
        dtype=draw(st.sampled_from(("bfloat16", "float16"))))
    if family == "7b":
        patch = draw(st.sampled_from((7, 14)))
        return FixtureSpec(variant="7b", patch_size=patch, image_size=patch * draw(st.integers(1, 3)), **common)
    if family == "vl":  # the genuine vl-7b layout: hub CLIP (336 px) resized at construction, SentencePiece, shards
        return FixtureSpec(variant="7b", patch_size=14, image_size=14 * draw(st.integers(2, 3)),
                           vision_tower=CLIP_HUB_ID, shards=2, tokenizer="sentencepiece", **common)
    tile = {"4khd": 336, "2d5": 560}[family]
    return FixtureSpec(variant=family, patch_size=14, image_size=tile, **common)


@st.composite
def qwen2_specs(draw) -> Qwen2FixtureSpec:
    kv = draw(st.integers(1, 2))
    return Qwen2FixtureSpec(
        name="qqwen2", layers=draw(st.integers(1, 2)), heads=kv * draw(st.integers(1, 3)), kv_heads=kv,
        head_dim=128, intermediate=draw(st.sampled_from(WIDTHS)), lora=_lora(draw, QWEN2_PROJECTIONS),
        qkv_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), vision_hidden=draw(st.sampled_from((16, 32))),
        vision_layers=1, dtype=draw(st.sampled_from(("bfloat16", "float16"))))


@st.composite
def quant_draws(draw, family: str) -> QuantDraw:
    spec = draw(qwen2_specs() if family == "qwen2" else xcomposer2_specs(family))
    segs = [Segment("text", text=draw(st.sampled_from(("Hi ", "Describe it: ", "[UNUSED_TOKEN_146]user\n"))))]
    if draw(st.booleans()):
        segs.insert(draw(st.integers(0, 1)), Segment("image", image=draw(st.sampled_from(IMAGES))))
    segs.append(Segment("text", text=draw(st.sampled_from(("What is it?", " two 7s", "")))))
    case = CanonicalInput(name="c", segments=tuple(s for s in segs if s.kind == "image" or s.text),
                          bos_policy=draw(st.sampled_from(("first", "every_text"))))
    return QuantDraw(spec=spec, w_bits=draw(st.sampled_from(W_BITS)), group_size=draw(st.sampled_from(GROUP_SIZES)),
                     compensate_plora=draw(st.booleans()), quant_policy=draw(st.sampled_from((0, 4, 8))),
                     numeric=draw(st.sampled_from(("fp32", "emulate"))), decode=draw(st.sampled_from((0, 3))),
                     case=case)


# ----------------------------------------------------------------------------- building


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(asdict(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def original_model(spec, root: Path) -> tuple[Path, dict | None]:
    """(the XComposer2 folder that is quantized, the lora_config TurboMind must resolve its drawn ranks with, or
    None when the folder carries its own). A Qwen2 PLoRA model is first disguised (`parity disguise`), as a user
    must before lmdeploy quantizes it: its parity_lora_config.json must reach the AWQ folder, so its run converts
    exactly as `parity run AWQ` does. The genuine-shaped model's hub CLIP is served from its own offline folder
    (what `--hub-model ID=PATH` does)."""
    from test_no_false_alarms import matching_lora_config

    folder = root / "models" / f"{spec.name}-{_key(spec)}"  # hyphenated, like real checkpoint folders
    if isinstance(spec, Qwen2FixtureSpec):
        from parity.disguise import disguise

        src = root / "qwen2" / f"{spec.name}-{_key(spec)}"
        if not (src / "model.safetensors").is_file():
            write_qwen2_model(spec, src)
        if not (folder / "config.json").is_file():
            disguise(src, folder, trust_remote_code=True, overwrite=True, quiet=True)
        return folder, None
    if not (folder / "config.json").is_file():
        write_model(spec, folder)
    if spec.vision_tower:
        from parity.reference import modelcode

        modelcode.provide(spec.vision_tower, write_hub_cache(spec, hf_home(root / "hub" / folder.name)))
    return folder, matching_lora_config(spec)


def run_draw(d: QuantDraw, root: Path):
    from parity.quant.quantize import quantize

    original, lora = original_model(d.spec, root)
    awq = root / "awq" / f"{original.name}-{int(d.compensate_plora)}"
    if not (awq / "config.json").is_file():
        quantize(original, awq, w_bits=d.w_bits, group_size=d.group_size, compensate_plora=d.compensate_plora,
                 trust_remote_code=True, overwrite=True)
    ws = convert_cached(awq, root / "workspaces", lora_config=lora) if lora else None  # None: as the CLI converts
    return run_parity(RunOptions(model=awq, workspace=ws, cases=[d.case], numeric=d.numeric, trust_remote_code=True,
                                 original=original, quant_policy=d.quant_policy, decode=d.decode,
                                 cache_dir=root))


def assert_clean_quantized(d: QuantDraw, report) -> None:
    errors = report.errors()
    other = [f for f in errors if (f.check, f.cause) != ("quant", "lora_smoothing_mismatch")]  # the structural one
    detail = "; ".join(f"[{f.check}/{f.cause} layer {f.layer} {f.module} {f.case}] {f.message}" for f in other[:5])
    assert not other, f"false alarm: {len(other)} error finding(s) for {d}: {detail}"
    assert not any(p.exceeded for p in report.points), f"a point over its threshold for {d}"
    mismatched = {(f.layer, f.module) for f in errors}
    layers = d.spec.layers
    want = set() if d.compensate_plora else {(i, m) for i in range(layers) for m in SMOOTHED}
    assert mismatched == want, f"lora_smoothing_mismatch on {sorted(mismatched)}, expected {sorted(want)} for {d}"
    assert report.status == ("pass" if d.compensate_plora else "fail")
    assert report.engine["weight_type"] == "int4"
    assert report.quantization["smoothing_kept"] == d.compensate_plora
    if d.quant_policy:
        assert report.quantization["kv_cache"]["bits"] == d.quant_policy
    assert [s.steps_run for s in report.decode] == ([d.decode] if d.decode else [])


def decodes_through_a_quantized_cache_in_fp32(d: QuantDraw) -> bool:
    """Refused (exit 2): a decode row through u8/u4 codes is judged at the deployment's precision only."""
    return bool(d.quant_policy and d.decode and d.numeric == "fp32")


def assert_clean_quantized_or_refused(d: QuantDraw, root: Path) -> None:
    """A drawn deployment runs clean; one the options refuse is refused, and runs clean in the mode it needs."""
    if decodes_through_a_quantized_cache_in_fp32(d):
        with pytest.raises(ParityInputError, match="needs --numeric emulate"):
            run_draw(d, root)
        d = replace(d, numeric="emulate")
    assert_clean_quantized(d, run_draw(d, root))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_quantized_runs_raise_no_alarm(family, root, monkeypatch):
    from parity.reference import modelcode

    monkeypatch.setenv(modelcode.PROVIDED_ENV, "{}")  # the vl family's hub CLIPs, undone after the test
    seen: list[QuantDraw] = []

    @seed(FAMILIES.index(family))  # fixed, and a different sequence of draws per family
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
              print_blob=True, suppress_health_check=list(HealthCheck))
    @given(d=quant_draws(family))
    def check(d: QuantDraw) -> None:
        seen.append(d)
        assert_clean_quantized_or_refused(d, root)

    check()
    assert len(seen) == EXAMPLES


# ----------------------------------------------------------------------------- found


# Found by this property with 6 draws per family (draw 6 of 4KHD): uncompensated smoothing, u4 KV cache, fp32 mode,
# 3 generated tokens, one image (3,817 rows). Beside the 4 structural findings, a decode finding: step 2, layer 0,
# attention, teacher-forced error 2.35e-4 over the fp32 cap 1e-4 while its own noise floor is 6.2e-3: the local
# attention rotates the reference's keys with the engine's rotary, and a u4 code near a rounding boundary flips;
# one row per step shows the flip whole. fp32 decoding through a quantized cache is now refused (exit 2); the same
# draw in emulate mode, the deployment's precision, runs clean.
FOUND_U4_DECODE = QuantDraw(
    spec=FixtureSpec(name="q4khd", variant="4khd", layers=1, heads=2, kv_heads=1, head_dim=128, intermediate=128,
                     vocab=128, lora={"attention.wqkv": (2, 1.0), "attention.wo": (64, 0.5),
                                      "feed_forward.w1": (1, 16.0), "feed_forward.w3": (64, 16.0),
                                      "feed_forward.w2": (64, 1.0)},
                     seed=1304, image_size=336, patch_size=14, vision_hidden=32, vision_layers=1, dtype="float16"),
    w_bits=4, group_size=128, compensate_plora=False, quant_policy=4, numeric="fp32", decode=3,
    case=CanonicalInput(name="c", bos_policy="first", segments=(
        Segment("image", image=Path(IMAGES_DIR) / "gradient.png"), Segment("text", text="Hi "))))


def test_found_u4_decode_draw_is_refused_in_fp32_and_clean_in_emulate(root):
    assert decodes_through_a_quantized_cache_in_fp32(FOUND_U4_DECODE)
    assert_clean_quantized_or_refused(FOUND_U4_DECODE, root)
