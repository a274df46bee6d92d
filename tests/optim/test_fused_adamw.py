"""The multi-tensor AdamW update: Triton kernel vs the reference, and the 8-bit state format vs bitsandbytes."""

import pytest
import torch

from nf4lora.kernels import use_kernels
from nf4lora.nf4.blockwise import dequantize_blockwise, quantize_blockwise
from nf4lora.nf4.codebook import dynamic_map
from nf4lora.optim import AdamW
from nf4lora.optim.fused_adamw import QBLOCK, Segment, adamw_update, step_scalars
from optim_helpers import random_segments

# segment sizes: a partial 256-block, several program blocks with a ragged tail, a single element
SIZES = [1000, 2048 * 3 + 77, 1]


def _segments(device, dtype, eight_bit):
    """Whole-parameter segments of SIZES, one 8-bit exp_avg block all zero where a segment is long enough."""
    return random_segments([(n, 0, n) for n in SIZES], device, dtype, eight_bit, zero_block=True)


SCALARS = [step_scalars(1e-2, 0.9, 0.999, 1e-8, 0.05, 7), step_scalars(3e-3, 0.8, 0.99, 1e-6, 0.0, 1)]


def _assert_triton_equals_reference(device, dtype, eight_bit):
    triton_segments = _segments(device, dtype, eight_bit)
    reference_segments = _segments(device, dtype, eight_bit)
    with use_kernels("triton"):
        adamw_update(triton_segments, SCALARS)
    with use_kernels("reference"):
        adamw_update(reference_segments, SCALARS)
    for a, b in zip(triton_segments, reference_segments):
        assert torch.equal(a.param, b.param)
        for name in a.state:
            assert torch.equal(a.state[name], b.state[name]), name


@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
def test_triton_kernel_matches_reference_bit_for_bit(device, eight_bit):
    # both paths round every operation once (no FMA, div_rn / sqrt_rn), so they agree exactly
    _assert_triton_equals_reference(device, torch.float32, eight_bit)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eight_bit", [False, True], ids=["32bit", "8bit"])
def test_triton_kernel_matches_reference_for_half_params_on_gpu(dtype, eight_bit):
    # the update is float32 either way; both paths round the new parameter to `dtype` once
    _assert_triton_equals_reference("cuda", dtype, eight_bit)


def test_segment_offsets_update_only_their_slice():
    n = 3000
    segments = _segments("cpu", torch.float32, False)[:1]
    whole = segments[0]
    param = torch.randn(n + 512)
    grad = torch.randn(n + 512) * 0.1
    before = param.clone()
    sliced = Segment(param, grad, 512, 1000, whole.state, 0)
    adamw_update([sliced], SCALARS)
    assert torch.equal(param[:512], before[:512])
    assert torch.equal(param[1512:], before[1512:])
    assert not torch.equal(param[512:1512], before[512:1512])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("n", [256 * 5, 256 * 3 + 100, 17])
def test_8bit_state_quantization_matches_bitsandbytes(bnb_functional, signed, n):
    # the moments' format: blockwise 256, signed dynamic map for exp_avg, unsigned for exp_avg_sq
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 1e-3
    if not signed:
        x = x * x  # a second moment is non-negative
    x[:min(n, 256)] *= torch.logspace(-6, 0, min(n, 256))  # values spanning the map's decades
    if n > 512:
        x[256:512] = 0.0  # an all-zero block
    code = dynamic_map(signed)
    indices, absmax = quantize_blockwise(x, code, QBLOCK)
    bnb_indices, bnb_state = bnb_functional.quantize_blockwise(x, code=code, blocksize=QBLOCK)
    assert torch.equal(indices, bnb_indices.view(-1))
    assert torch.equal(absmax, bnb_state.absmax)
    ours = dequantize_blockwise(indices, absmax, code, QBLOCK, torch.float32)
    theirs = bnb_functional.dequantize_blockwise(bnb_indices, bnb_state)
    assert torch.equal(ours, theirs.view(-1))


def test_step_scalars_are_float32_values():
    values = step_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    assert values == torch.tensor(values, dtype=torch.float32).tolist()
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2, eps = values
    assert (beta1, beta2) == (pytest.approx(0.9, rel=1e-7), pytest.approx(0.999, rel=1e-7))
    assert one_minus_beta1 + beta1 == pytest.approx(1.0, rel=1e-7)
    assert one_minus_beta2 == pytest.approx(0.001, rel=1e-6)  # 1 - 0.999 in float64, then rounded once
    assert eps == pytest.approx(1e-8, rel=1e-7)
    # float32 rounding of the float64 formulas: relative 1e-7 > 2**-24
    assert step_size == pytest.approx(1e-3 / (1 - 0.9**3), rel=1e-7)
    assert inv_bc2 == pytest.approx((1 - 0.999**3) ** -0.5, rel=1e-7)
    assert decay == pytest.approx(1 - 1e-5, rel=1e-7)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_first_step_8bit_states_are_bitsandbytes_quantized_moments(bnb_functional, device, path):
    # from zero state, step 1 stores m = g * (1 - beta1) and v = (g * (1 - beta2)) * g: the optimizer's codes and
    # absmax must be bitsandbytes' blockwise quantization of exactly those (signed map for m, unsigned for v)
    g = torch.Generator().manual_seed(3)
    param = torch.nn.Parameter(torch.randn(77, 130, generator=g).to(device))
    grad = torch.randn(77, 130, generator=g) * 0.01
    grad[:2] = 0.0  # whole zero blocks, as LoRA's A gets at step 1
    param.grad = grad.to(device)
    optimizer = AdamW([param], lr=1e-3, optim_bits=8)
    with use_kernels(path):
        optimizer.step()
    state = optimizer.state_dict()["state"][0]
    _, _, one_minus_beta1, _, one_minus_beta2, *_ = step_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
    moments = {"1": (grad * one_minus_beta1, True), "2": ((grad * one_minus_beta2) * grad, False)}
    for name, (moment, signed) in moments.items():
        codes, bnb_state = bnb_functional.quantize_blockwise(moment, code=dynamic_map(signed), blocksize=QBLOCK)
        assert torch.equal(state["state" + name].cpu(), codes), name
        assert torch.equal(state["absmax" + name].cpu(), bnb_state.absmax), name
