"""Hypothesis properties of quantize/dequantize: error bound, exact round trips, equivariance, idempotence."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nf4lora.nf4 import dequantize, dynamic_map, get_code, quantize
from nf4lora.nf4.blockwise import blockwise_absmax_and_scaled, unpack_nibbles
from nf4lora.nf4.codebook import quantize_bounds

BLOCKSIZES = st.sampled_from([32, 64, 128, 256])
QUANT_TYPES = st.sampled_from(["nf4", "fp4"])
# finite float32 values; magnitudes under 1e-30 become exact zeros, which keeps every block's absmax out of the
# subnormal range where bitsandbytes' 1e-38 reciprocal guard takes over (that case has its own test below)
ELEMENTS = st.floats(-1e4, 1e4, width=32).map(lambda v: v if abs(v) > 1e-30 else 0.0)
WEIGHTS = st.integers(1, 700).flatmap(lambda n: arrays(np.float32, n, elements=ELEMENTS)).map(torch.from_numpy)
PROPERTY = settings(max_examples=60, deadline=None)


def max_gap(code: torch.Tensor) -> float:
    return float(code.sort().values.diff().max())


def absmax_error_bound(q) -> torch.Tensor:
    """Per-block bound on |absmax - decoded absmax| (double_quant.py derives it)."""
    state = q.state
    if not state.double_quant:
        return torch.zeros_like(state.absmax)
    per_unit = max_gap(dynamic_map(signed=True)) / 2 + 1 / 65535
    nested = state.nested_absmax.repeat_interleave(256)[: state.absmax.numel()]
    return per_unit * nested + 1e-6 * state.absmax_float32().abs()


@PROPERTY
@given(w=WEIGHTS, blocksize=BLOCKSIZES, quant_type=QUANT_TYPES, double_quant=st.booleans())
def test_every_error_is_within_half_the_widest_code_gap_times_absmax(w, blocksize, quant_type, double_quant):
    q = quantize(w, blocksize, quant_type, double_quant)
    n = w.numel()
    true_absmax, _ = blockwise_absmax_and_scaled(w, blocksize)
    per_element = lambda t: t.repeat_interleave(blocksize)[:n]  # noqa: E731
    bound = (
        max_gap(get_code(quant_type)) / 2 * per_element(true_absmax) * (1 + 1e-6)
        + per_element(absmax_error_bound(q))
        + 1e-38  # blocks whose absmax is below bitsandbytes' reciprocal guard
    )
    error = (dequantize(q, torch.float32) - w).abs()
    assert bool((error <= bound).all()), float((error - bound).max())


@PROPERTY
@given(
    indices=arrays(np.int64, st.integers(1, 600), elements=st.integers(0, 15)),
    exponent=st.integers(-20, 20),
    quant_type=QUANT_TYPES,
    blocksize=BLOCKSIZES,
    double_quant=st.booleans(),
)
def test_codebook_values_times_a_power_of_two_round_trip_exactly(indices, exponent, quant_type, blocksize, double_quant):
    code = get_code(quant_type)
    values = code[torch.from_numpy(indices)]
    values[::blocksize] = 1.0  # every block reaches the absmax, so the scale is exactly 2**exponent
    w = values * 2.0**exponent
    assert torch.equal(dequantize(quantize(w, blocksize, quant_type, double_quant)), w)


@PROPERTY
@given(w=WEIGHTS, exponent=st.integers(-8, 8), blocksize=BLOCKSIZES, quant_type=QUANT_TYPES, double_quant=st.booleans())
def test_quantization_is_scale_equivariant_for_powers_of_two(w, exponent, blocksize, quant_type, double_quant):
    q = quantize(w, blocksize, quant_type, double_quant)
    scaled = quantize(w * 2.0**exponent, blocksize, quant_type, double_quant)
    assert torch.equal(scaled.packed, q.packed)
    assert torch.equal(dequantize(scaled), dequantize(q) * 2.0**exponent)


@PROPERTY
@given(w=WEIGHTS, blocksize=BLOCKSIZES, double_quant=st.booleans())
def test_fp4_is_sign_symmetric_off_ties(w, blocksize, double_quant):
    code = get_code("fp4")
    assert torch.equal(code.sort().values, (-code).sort().values)  # the property needs a symmetric codebook
    bounds, _ = quantize_bounds(code)
    ties = bounds[bounds != 0].abs()  # the midpoint between FP4's two zeros decodes to 0 on either side
    _, scaled = blockwise_absmax_and_scaled(w, blocksize)
    assume(not bool(torch.isin(scaled.abs(), ties).any()))  # a tie goes to the lower code either way
    positive = dequantize(quantize(w, blocksize, "fp4", double_quant))
    negative = dequantize(quantize(-w, blocksize, "fp4", double_quant))
    assert torch.equal(negative, -positive)


def test_nf4_is_not_sign_symmetric():
    w = torch.tensor([0.0796, 1.0] * 32)
    assert not torch.equal(dequantize(quantize(-w)), -dequantize(quantize(w)))


@PROPERTY
@given(w=WEIGHTS, blocksize=BLOCKSIZES, quant_type=QUANT_TYPES, double_quant=st.booleans())
def test_quantize_of_dequantize_is_idempotent(w, blocksize, quant_type, double_quant):
    q = quantize(w, blocksize, quant_type, double_quant)
    again = quantize(dequantize(q, torch.float32), blocksize, quant_type, double_quant)
    code = get_code(quant_type)
    chosen = lambda t: code[unpack_nibbles(t.packed, t.numel()).long()]  # noqa: E731  FP4 has two zero codes
    assert torch.equal(chosen(again), chosen(q))
    if not double_quant:
        assert torch.equal(again.state.absmax, q.state.absmax)
        assert torch.equal(dequantize(again), dequantize(q))


@pytest.mark.parametrize("tiny", [1e-39, 1e-44])
def test_subnormal_blocks_stay_finite(tiny):
    w = torch.full((64,), tiny)
    out = dequantize(quantize(w, double_quant=False))
    assert bool(torch.isfinite(out).all()) and bool((out.abs() <= tiny).all())
