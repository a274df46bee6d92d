import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels import gemv_nf4, nf4_linear, nf4_linear_parts, use_kernels
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref

# Relative error against float64 on the same rounded operands: fp32 1e-5 (summation-order rounding
# near 1e-7), fp16 2e-3 and bf16 1e-2 (one output rounding of 2**-11 / 2**-8 plus accumulation).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return float((out.detach().cpu().double() - ref.double()).norm() / ref.double().norm())


def reference_grads(x, q, bias, grad_out):
    """Forward and gradients in float64 through F.linear on the dequantized weight (rounded to x.dtype)."""
    w = dequantize_ref(q.to("cpu"), x.dtype).double()
    xr = x.detach().cpu().double().requires_grad_()
    br = bias.detach().cpu().to(x.dtype).double().requires_grad_()
    y = F.linear(xr, w, br)
    y.backward(grad_out.cpu().double())
    return y.detach(), xr.grad, br.grad


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("lead_shape, K", [((1,), 96), ((3,), 96), ((17,), 200), ((2, 9), 64), ((3,), 65)])
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_nf4_linear_forward_and_grads_match_reference(device, mode, lead_shape, K, dtype):
    if mode == "triton":
        skip_interpreter_bf16(device, dtype)
    N = 40
    q = quantize_ref(torch.randn(N, K)).to(device)
    x = torch.randn(*lead_shape, K).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(*lead_shape, N).to(device=device, dtype=dtype)
    with use_kernels(mode):
        y = nf4_linear(x, q, bias)
        y.backward(grad_out)
    y_ref, gx_ref, gb_ref = reference_grads(x, q, bias, grad_out)
    assert y.shape == (*lead_shape, N) and y.dtype == dtype
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    assert x.grad.dtype == dtype and rel_err(x.grad, gx_ref) < TOLERANCE[dtype]
    assert bias.grad.dtype == dtype and rel_err(bias.grad, gb_ref) < TOLERANCE[dtype]


def test_nf4_linear_saves_only_the_packed_weight(device):
    N, K = 48, 64
    q = quantize_ref(torch.randn(N, K)).to(device)
    x = torch.randn(5, K, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4_linear(x, q)
    assert not any(t.numel() >= N * K for t in saved), "a dense weight was saved for backward"
    y.sum().backward()
    assert x.grad is not None
    assert not q.packed.requires_grad and q.packed.grad is None


def test_nf4_linear_without_bias_and_without_grad(device):
    q = quantize_ref(torch.randn(8, 64)).to(device)
    x = torch.randn(2, 64, device=device)
    with torch.no_grad():
        y = nf4_linear(x, q)
    expected = x.cpu().double() @ dequantize_ref(q.to("cpu"), torch.float32).double().T
    assert not y.requires_grad and rel_err(y, expected) < 1e-5  # fp32: see TOLERANCE


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_nf4_linear_records_a_node_only_when_something_needs_a_gradient(device, mode):
    q = quantize_ref(torch.randn(8, 64)).to(device)
    x = torch.randn(3, 64, device=device)
    bias = torch.randn(8, device=device)
    with use_kernels(mode):
        frozen = nf4_linear(x, q, bias)  # grad mode on, but no input asks for a gradient
        tracked = nf4_linear(x.requires_grad_(), q, bias)
    assert frozen.grad_fn is None and type(tracked.grad_fn).__name__ == "NF4LinearFunctionBackward"
    assert torch.equal(frozen, tracked.detach())


def test_nf4_linear_rejects_bad_inputs():
    q = quantize_ref(torch.randn(8, 64))
    with pytest.raises(ValueError, match="x has 63 features in its last dim, expected in_features=64"):
        nf4_linear(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="qweight must be a QuantizedTensor, got Tensor"):
        nf4_linear(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(8,\)"):
        nf4_linear(torch.randn(2, 64), q, torch.randn(7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        nf4_linear(torch.ones(2, 64, dtype=torch.long), q)
    with pytest.raises(ValueError, match=r"qweight must be 2-D .* got shape \(2, 4, 64\)"):
        nf4_linear(torch.randn(2, 64), quantize_ref(torch.randn(2, 4, 64)))


@pytest.mark.parametrize("lead_shape, grad, fused", [((1, 1), False, True), ((2, 1), False, True),
                                                      ((1, 3), False, False), ((2,), True, False)])
def test_nf4_linear_parts_fuses_decode_rows_and_equals_separate_calls(device, monkeypatch, lead_shape, grad, fused):
    launches = []
    real = gemv_nf4.fused_matmul_parts
    monkeypatch.setattr(gemv_nf4, "fused_matmul_parts", lambda *args: launches.append(1) or real(*args))
    weights = [quantize_ref(torch.randn(n, 128)).to(device) for n in (40, 24, 24)]
    x = torch.randn(*lead_shape, 128, device=device).requires_grad_(grad)
    with use_kernels("triton"):
        outs = nf4_linear_parts(x, weights)
        expected = [nf4_linear(x, q) for q in weights]
    assert len(launches) == int(fused)  # one launch for all three on 1 or 2 rows without autograd
    for out, exp, q in zip(outs, expected, weights):
        assert out.shape == (*lead_shape, q.shape[0])
        assert rel_err(out, exp.detach().cpu()) < TOLERANCE[torch.float32]
    if grad:  # the unfused path keeps autograd to x
        sum(out.sum() for out in outs).backward()
        assert x.grad is not None
