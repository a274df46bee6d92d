import threading

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels import gemv_nf4, nf4_linear, nf4_linear_parts, use_kernels
from nf4lora.lora.fused import lora_linear
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
    with pytest.raises(TypeError, match="x has dtype torch.int64; valid: float32, float16, bfloat16"):
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


@pytest.mark.parametrize(
    "lead_shape, K, kernel",
    [
        ((1,), 128, "_gemv_kernel"),
        ((2,), 128, "_gemv_kernel"),
        ((3,), 128, "_tile_kernel"),
        ((2, 8), 128, "_tile_kernel"),  # 16 rows: the last M the fused kernels take
        ((17,), 128, "_dequantize_kernel"),  # then dequantize + GEMM
        ((1,), 96, "_dequantize_kernel"),  # K not whole 64-blocks: the fused kernels cannot read it
    ],
)
def test_nf4_linear_takes_the_fused_kernels_up_to_16_rows(kernel_launches, triton_mode, lead_shape, K, kernel):
    """The dispatcher picks the path by rows of x and K: the GEMV for 1-2 rows, the tile kernel for 3-16, and
    dequantize + GEMM beyond, or for a K the fused kernels cannot read; each path's output matches F.linear."""
    q = quantize_ref(torch.randn(8, K))
    x = torch.randn(*lead_shape, K)
    y = nf4_linear(x, q)
    assert kernel_launches == [kernel]
    assert rel_err(y, F.linear(x.double(), dequantize_ref(q, torch.float32).double())) < TOLERANCE[torch.float32]


def _reachable_tensors(obj, depth=4):
    """Tensors reachable from ``obj`` through attributes, dataclass fields, sequences and dict values."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or isinstance(obj, (str, bytes, int, float, torch.dtype, torch.device, torch.Size, type)):
        return []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in _reachable_tensors(child, depth - 1)]


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("M", [1, 3, 17])  # the GEMV, the tile kernel, dequantize + GEMM
def test_nf4_linear_keeps_only_the_quantized_weight_and_gives_it_no_gradient(device, mode, M):
    """Between forward and backward the graph holds the weight's own packed codes and state and no other tensor
    (no dense copy, not x), whether saved for backward or set on the autograd context; backward gives x and
    bias their gradients and leaves the weight untouched: no new attribute, no gradient, nothing requiring one."""
    N, K = 48, 64
    q = quantize_ref(torch.randn(N, K)).to(device)
    own = {t.untyped_storage().data_ptr() for t in (q.packed, *q.state.tensors().values())}
    x = torch.randn(M, K, device=device, requires_grad=True)
    bias = torch.randn(N, device=device, requires_grad=True)
    saved = []
    with use_kernels(mode), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4_linear(x, q, bias)
    held = saved + _reachable_tensors(vars(y.grad_fn))
    assert all(t.untyped_storage().data_ptr() in own for t in held), [tuple(t.shape) for t in held]
    with use_kernels(mode):
        y.backward(torch.randn_like(y))
    assert x.grad is not None and bias.grad is not None
    assert set(vars(q)) == {"packed", "state"}
    for t in (q.packed, *q.state.tensors().values()):
        assert t.grad is None and not t.requires_grad


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)])
def test_nf4_linear_takes_an_empty_batch(device, mode, lead_shape):
    """No rows of x: an empty (..., N) output, an empty grad_input and a zero bias gradient on every path (the
    Triton path sized its split-K grid by rows and divided by zero)."""
    q = quantize_ref(torch.randn(40, 128)).to(device)
    x = torch.randn(*lead_shape, 128, device=device, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    with use_kernels(mode):
        y = nf4_linear(x, q, bias)
        y.sum().backward()
    assert y.shape == (*lead_shape, 40) and x.grad.shape == x.shape
    assert torch.equal(bias.grad.cpu(), torch.zeros(40))


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_nf4_linear_refuses_x_of_another_dtype_in_one_line(mode, rows):
    q = quantize_ref(torch.randn(8, 64))
    with use_kernels(mode), pytest.raises(TypeError, match=r"^x has dtype torch.float64; valid: float32, float16, bfloat16$"):
        nf4_linear(torch.randn(rows, 64, dtype=torch.float64), q)


@pytest.mark.parametrize("op", ["nf4_linear", "lora_linear"])
@pytest.mark.parametrize("forward_mode, thread_mode", [("triton", "reference"), ("reference", "triton")])
def test_backward_on_another_thread_keeps_its_forward_mode(kernel_launches, monkeypatch, op, forward_mode, thread_mode):
    """On CUDA autograd runs backward on its own worker thread, which a thread-local ``use_kernels`` block does
    not reach: the backward's dequantize follows the mode its forward ran under, not the thread's."""
    monkeypatch.setenv("NF4LORA_KERNELS", thread_mode)
    q = quantize_ref(torch.randn(8, 128))
    x = torch.randn(17, 128, requires_grad=True)  # dequantize + GEMM, forward and backward
    with use_kernels(forward_mode):
        if op == "nf4_linear":
            y = nf4_linear(x, q)
        else:
            y = lora_linear(x, x, q, None, torch.randn(4, 128), torch.randn(8, 4), 2.0)
    forward_launches = len(kernel_launches)
    backward = threading.Thread(target=lambda: y.sum().backward())
    backward.start()
    backward.join()
    assert x.grad is not None
    assert kernel_launches[forward_launches:] == (["_dequantize_kernel"] if forward_mode == "triton" else [])
