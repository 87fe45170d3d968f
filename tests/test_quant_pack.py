"""Properties of the 4-bit packings and dequantizations (parity.quant.pack)."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.quant.pack import (
    dequantize_exact,
    dequantize_turbomind,
    pack_awq,
    pack_rows,
    quantize_rtn,
    unpack_awq,
    unpack_rows,
)


def _u4(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), packs=st.integers(1, 6))
def test_pack_unpack_round_trips(seed, rows, packs):
    u = _u4(seed, rows, 8 * packs)
    assert torch.equal(unpack_awq(pack_awq(u)), u)
    assert torch.equal(unpack_rows(pack_rows(u)), u)
    # a packed int32 unpacks back to itself through both orders
    x = pack_rows(u)
    assert torch.equal(pack_awq(unpack_awq(x)), x)


def test_orders_differ_and_match_upstream_layouts():
    u = torch.arange(8, dtype=torch.uint8).view(1, 8)
    # TurboMind (pack_u4_row): nibble i = column i -> 0x76543210
    assert int(pack_rows(u)[0, 0]) == 0x76543210
    # AWQ: nibble i = column AWQ_ORDER[i] = 0,2,4,6,1,3,5,7 -> 0x75316420
    assert int(pack_awq(u)[0, 0]) == 0x75316420
    with pytest.raises(ValueError):
        pack_rows(torch.full((1, 8), 16))


def _half_round(x: float) -> float:
    """IEEE binary16 round-to-nearest-even of a Python float (struct's 'e' format), independent of torch/numpy."""
    return struct.unpack("<e", struct.pack("<e", x))[0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]),
       groups=st.integers(1, 3), cols=st.sampled_from([8, 16]))
def test_dequantize_turbomind_is_one_fp16_rounding_of_q_s_plus_m(seed, group, groups, cols):
    g = torch.Generator().manual_seed(seed)
    rows = group * groups
    q = _u4(seed, rows, cols)
    zeros = torch.randint(0, 16, (groups, cols), generator=g).to(torch.float16)
    scales = (torch.rand(groups, cols, generator=g) * 10 ** torch.empty(groups, cols).uniform_(-4, 0, generator=g)
              ).to(torch.float16)
    got = dequantize_turbomind(q, zeros, scales, group)
    exact = dequantize_exact(q, zeros, scales, group)
    for i in range(0, rows, max(1, rows // 7)):
        for j in range(cols):
            s, z = float(scales[i // group, j]), float(zeros[i // group, j])
            m = _half_round(-z * s)               # fuse_scales_and_zeros: half(-z * s)
            want = _half_round(float(q[i, j]) * s + m)  # __hfma(q, s, m): exact q*s + m, one rounding
            assert float(got[i, j]) == want
            assert float(exact[i, j]) == (float(q[i, j]) - z) * s  # exact in float32
    assert got.dtype == torch.float16 and exact.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 8), group=st.sampled_from([4, 16, 32, 128]),
       groups=st.integers(1, 3))
def test_round_to_nearest_error_is_within_half_a_step(seed, bits, group, groups):
    w = torch.randn(group * groups, 16, generator=torch.Generator().manual_seed(seed))
    q, zeros, scales = quantize_rtn(w, bits, group)
    assert int(q.max()) <= 2**bits - 1
    back = dequantize_exact(q, zeros, scales, group)
    step = scales.float().repeat_interleave(group, dim=0)
    z = zeros.float().repeat_interleave(group, dim=0)
    # lmdeploy's rule clamps the zero point to 0..2^bits-1, so a group that does not straddle 0 can clip; every
    # value that rounds inside 0..2^bits-1 is within half a step (plus the fp16 rounding of the stored scale over
    # at most 2^bits steps)
    inside = (w >= (-z - 0.49) * step) & (w <= (2**bits - 1 - z + 0.49) * step)
    slack = step * (0.5 + (2**bits) * 2**-10)
    assert bool(((back - w).abs() <= slack + 1e-6)[inside].all())
