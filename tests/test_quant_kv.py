"""KV-cache quantization as TurboMind 0.7.1 computes it (parity.quant.kv)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from parity.quant.kv import bits_for_policy, dequantize_kv, kv_roundtrip, quantize_kv


def _half(x: float) -> float:
    """IEEE half, round to nearest even; a value beyond the half range becomes inf, as the kernel's conversion."""
    with np.errstate(over="ignore"):
        return float(np.float16(x))


def _cvt_rni_sat_u8(u: float) -> int:
    """PTX cvt.rni.sat.u8: NaN -> 0, saturating at 0 and 255, ties to even (Python's round)."""
    if math.isnan(u):
        return 0
    return 255 if u >= 255 else 0 if u <= 0 else min(round(u), 255)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), tokens=st.integers(1, 5),
       heads=st.integers(1, 3), spread=st.floats(1e-3, 1e3))
@example(seed=0, bits=8, tokens=1, heads=1, spread=1e-3)  # a half scale so small that 1/scale overflows to inf
@example(seed=0, bits=4, tokens=2, heads=1, spread=1e-3)
def test_per_token_and_head_asymmetric_with_turbomind_rounding(seed, bits, tokens, heads, spread):
    x = torch.randn(tokens, heads, 16, generator=torch.Generator().manual_seed(seed)) * spread
    kv = quantize_kv(x, bits, torch.float16)
    assert kv.q.dtype == torch.uint8 and int(kv.q.max()) <= 2**bits - 1
    assert kv.scale.shape == (tokens, heads, 1) and kv.zero.shape == (tokens, heads, 1)
    xh = x.to(torch.float16)
    for t in range(tokens):
        for h in range(heads):
            row = [float(v) for v in xh[t, h]]
            lo, hi = min(row), max(row)
            # warp_stats: float32 (max - min) * float32(1 / q_max), stored in half
            scale = _half(float(np.float32(hi - lo) * (np.float32(1) / np.float32(2**bits - 1))))
            assert float(kv.scale[t, h, 0]) == scale and float(kv.zero[t, h, 0]) == lo
            inv = _half(1.0 / scale) if scale else float("inf")
            for c, v in enumerate(row):
                u = _half(_half(v - lo) * inv)  # 0 * inf is NaN (a constant row, or the row's minimum)
                want = min(_cvt_rni_sat_u8(u), 2**bits - 1)
                assert int(kv.q[t, h, c]) == want
    back = dequantize_kv(kv, torch.float16)
    for t in range(tokens):
        for h in range(heads):
            s, z = float(kv.scale[t, h, 0]), float(kv.zero[t, h, 0])
            for c in range(16):
                assert float(back[t, h, c]) == _half(int(kv.q[t, h, c]) * s + z)  # one rounding (fma)


@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.15)])
def test_roundtrip_error_is_about_half_a_step(bits, bound):
    x = torch.randn(64, 4, 128, generator=torch.Generator().manual_seed(1))
    y = kv_roundtrip(x, bits).float()
    rel = float((y - x).norm() / x.norm())
    assert 0 < rel < bound
    worse = kv_roundtrip(x, bits, scale_factor=1.3).float()
    assert float((worse - x).norm() / x.norm()) > 0.2  # the fault the catalogue injects: read with a wrong scale


def test_constant_rows_and_policy():
    x = torch.full((2, 1, 8), 0.5)
    assert torch.equal(kv_roundtrip(x, 4).float(), x)
    assert bits_for_policy(0) == 0 and bits_for_policy(4) == 4 and bits_for_policy(8) == 8
    with pytest.raises(ValueError):
        bits_for_policy(2)


@pytest.mark.parametrize("policy", [8, 4])
def test_quantized_kv_cache_replay_is_faithful_and_its_cost_is_reported(fixture_models, policy):
    from parity.pipeline import RunOptions, run_parity

    report = run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], trust_remote_code=True,
                                   quant_policy=policy))
    assert report.status == "pass", [f.message for f in report.errors()]
    kv = report.quantization["kv_cache"]
    assert kv["bits"] == policy and {r["layer"] for r in kv["rows"]} == {0, 1, 2}
    assert all(0 < r["drift"] < (0.02 if policy == 8 else 0.2) for r in kv["rows"])
    assert not any(r["over_budget"] for r in kv["rows"])


def test_kv_cost_names_a_cache_over_its_budget(fixture_models, monkeypatch):
    """The budget check itself: a cache read back with a wrong scale (on the reference side) is over budget."""
    import parity.quant.kv_reference as kv_reference
    from parity.fixtures import IMAGES_DIR
    from parity.inputs import default_cases, prepare
    from parity.quant.report import kv_cache_section
    from parity.reference.loader import load_reference

    ref = load_reference(fixture_models["xcomposer2-tiny"], trust_remote_code=True)
    case = default_cases(sorted(IMAGES_DIR.glob("*.png"))[0])[0]
    p = prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
    findings, section = kv_cache_section(ref, [p], 4, torch.bfloat16)
    assert findings == [] and section["rows"]
    right = kv_reference.turbomind_kv
    monkeypatch.setattr(kv_reference, "turbomind_kv", lambda bits, dtype: right(bits, dtype, scale_factor=1.3))
    findings, _ = kv_cache_section(ref, [p], 4, torch.bfloat16)
    assert [(f.layer, f.module, f.cause) for f in findings] == [(0, "attention", "kv_quant_drift")]


def test_quant_policy_bad_input(fixture_models, tmp_path, capsys):
    from parity.cli import main

    m = str(fixture_models["xcomposer2-tiny"])
    assert main(["run", m, "--trust-remote-code", "--quant-policy", "2", "--out", str(tmp_path / "r")]) == 2
    capsys.readouterr()
    assert main(["run", m, "--trust-remote-code", "--quant-policy", "4", "--engine", "turbomind",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "emulated by the replay" in " ".join(err.split()) and "Traceback" not in err
    # decoding through a quantized cache is judged at the deployment's precision (a code flip is not a fault)
    assert main(["run", m, "--trust-remote-code", "--quant-policy", "4", "--decode", "3",
                 "--out", str(tmp_path / "r")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--decode with --quant-policy 4 needs --numeric emulate" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_decode_reads_the_quantized_cache(fixture_models):
    import json

    from parity.pipeline import RunOptions, run_parity

    report = run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], trust_remote_code=True, quant_policy=4,
                                   decode=3, numeric="emulate"))
    assert report.status == "pass", [f.message for f in report.errors()]
    assert '"kv_storage": "u4' in json.dumps(report.to_dict(), default=str)


def test_quantized_storage_round_trips_like_the_cache():
    from parity.quant.kv import QuantizedStorage

    st = QuantizedStorage(8, torch.float16)
    block = st.alloc(2, 4, 16)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3))
    st.write(block, 1, x)
    assert torch.equal(st.read(block, 4)[:, 1:], kv_roundtrip(x, 8).float())
    assert st.nbytes(block) == 2 * 4 * 16 + 2 * (2 * 4) * 2


@pytest.mark.parametrize("policy", [8, 4])
def test_small_attention_fault_is_named_under_a_quantized_cache(fixture_models, monkeypatch, policy):
    """A quantized KV cache must not lift the fp32 bounds of the attention it feeds: an attention core 1% off
    (e.g. a softmax scale; a fault injected for this test only) is named at layer 0 · attention, as without a
    quantized cache. (A rule that judged cache readers at the low-precision bounds let it pass.)"""
    from parity.deploy import replay
    from parity.pipeline import RunOptions, run_parity

    right = replay.ReplayEngine._attention

    def attention_one_percent_off(self, *args, **kwargs):
        return right(self, *args, **kwargs) * 1.01

    monkeypatch.setattr(replay.ReplayEngine, "_attention", attention_one_percent_off)
    report = run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], trust_remote_code=True,
                                   quant_policy=policy, numeric="fp32"))
    assert report.status == "fail"
    first = report.first_divergence
    assert (first.layer, first.module, first.positions, first.cause) == (0, "attention", "all", "numeric_drift"), first
