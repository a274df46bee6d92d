"""``nf4_linear`` under ``torch.autocast``: every path computes in autocast's dtype, as ``F.linear`` would."""

import pytest
import torch

from nf4lora.kernels import nf4_linear, use_kernels
from nf4lora.nf4.tensor import quantize as quantize_ref


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("M", [2, 40], ids=["fused-gemv", "dequant-matmul"])
def test_nf4_linear_under_autocast_equals_the_call_on_inputs_cast_to_the_autocast_dtype(device, mode, M):
    q = quantize_ref(torch.randn(24, 64)).to(device)
    x = torch.randn(M, 64, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    xc, bc = (t.detach().bfloat16().requires_grad_() for t in (x, bias))
    grad_out = torch.randn(M, 24, device=device, dtype=torch.bfloat16)
    with use_kernels(mode):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = nf4_linear(x, q, bias)
        y.backward(grad_out)
        expected = nf4_linear(xc, q, bc)
        expected.backward(grad_out)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)  # the same path on the same bf16 operands
    assert x.grad.dtype == bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xc.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, bc.grad.float(), rtol=0, atol=0)
