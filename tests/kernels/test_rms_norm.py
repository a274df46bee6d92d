import pytest
import torch
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_reference, supports

# The kernel sums the squares in another order than torch: one unit in the last place of x.dtype at most,
# and only where the float32 value sits next to a rounding boundary.
ULP = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 5, 80), (7, 1000)])
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_rms_norm_matches_the_model_formula(poisoned, device, shape, dtype):
    skip_interpreter_bf16(device, dtype)
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    out = rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-5), rtol=ULP[dtype], atol=ULP[dtype])


@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_add_rms_norm_returns_the_rounded_sum_and_its_norm(poisoned, device, dtype):
    skip_interpreter_bf16(device, dtype)
    x, delta = (torch.randn(2, 3, 96, dtype=dtype, device=device) for _ in range(2))
    weight = torch.randn(96, dtype=dtype, device=device)
    total, out = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)  # the residual stream is bitwise the eager add
    torch.testing.assert_close(out, rms_norm_reference(x + delta, weight, 1e-6), rtol=ULP[dtype], atol=ULP[dtype])


def test_eps_counts_for_small_rows(device):
    x = torch.randn(3, 64, device=device) * 1e-3  # mean square 1e-6, below eps: the eps dominates the scale
    weight = torch.ones(64, device=device)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), rtol=2e-6, atol=1e-9)


def test_fp32_weight_promotes_and_strided_rows_are_read(device):
    # a half-precision x with a float32 weight gives float32, as torch's promotion does; x rows strided
    x = torch.randn(4, 128, dtype=torch.float16, device=device)[:, :64]
    weight = torch.randn(64, device=device)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-5), rtol=1e-3, atol=1e-3)


def test_refuses_what_it_cannot_take(device):
    x = torch.randn(2, 8, device=device)
    assert not supports(x, torch.ones(9, device=device))
    assert not supports(x.long(), torch.ones(8, device=device))
    assert not supports(x, torch.ones(8, device=device), torch.randn(2, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="rms_norm takes"):
        rms_norm(x, torch.ones(9, device=device), 1e-6)
