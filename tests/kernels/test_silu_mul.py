import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels.silu_mul import silu_mul, supports

# Triton's exp against torch's: the float32 silu may differ in its last bits, which can move the rounded
# value by one unit in the last place of the dtype.
ULP = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_silu_mul_matches_eager(poisoned, device, dtype):
    skip_interpreter_bf16(device, dtype)
    # gate and up as halves of one grouped projection output: strided rows; 1500 columns is not whole blocks
    both = torch.randn(2, 3, 3000, dtype=dtype, device=device) * 4
    gate, up = both.split(1500, dim=-1)
    out = silu_mul(gate, up)
    assert out.shape == gate.shape and out.is_contiguous()
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=ULP[dtype], atol=ULP[dtype])


def test_refuses_mismatched_inputs(device):
    gate = torch.randn(2, 8, device=device)
    assert not supports(gate, torch.randn(2, 9, device=device))
    assert not supports(gate, gate.half())
    with pytest.raises(ValueError, match="silu_mul takes"):
        silu_mul(gate, gate.half())
