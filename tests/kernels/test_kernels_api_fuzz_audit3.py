"""Audit of ``nf4_linear`` under higher-order and transformed autograd, and of x layouts, against float64 references
built from ``nf4lora.nf4.dequantize``."""

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from nf4lora.kernels import dispatch, nf4_linear, nf4_linear_parts, use_kernels
from nf4lora.nf4 import tensor as nf4_tensor

K, N = 64, 32


def one_line(pattern: str) -> str:
    return rf"^{pattern}[^\n]*$"


def weight(device, rows=N, blocksize=64):
    """A fresh random NF4 weight (rows, K) and its dequantized float64 copy."""
    q = nf4_tensor.quantize(torch.randn(rows, K, device=device), blocksize=blocksize)
    return q, nf4_tensor.dequantize(q, torch.float32).double()


def max_rel(out, ref) -> float:
    return float((out.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mode", ["reference", "triton"])
@pytest.mark.parametrize("M", [3, 20])  # the fused kernels' rows and dequantize + matmul's
def test_double_backward_equals_the_float64_reference_after_another_layer_runs(device, mode, M):
    q, w = weight(device)
    other, _ = weight(device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    grad_out = torch.randn(M, N, device=device, requires_grad=True)
    with use_kernels(mode):
        (grad_x,) = torch.autograd.grad(nf4_linear(x, q), x, grad_out, create_graph=True)
        # another layer of the same shape between the two backwards, as in a model
        nf4_linear(torch.randn(M, K, device=device, requires_grad=True), other).sum().backward()
    v = torch.randn(M, K, device=device)
    (grad_grad_out,) = torch.autograd.grad(grad_x, grad_out, v)
    assert max_rel(grad_grad_out, v.double() @ w.T) < 1e-5


def _vmap(q, x):
    return torch.func.vmap(lambda row: nf4_linear(row, q))(x)


def _grad(q, x):
    return torch.func.grad(lambda x: nf4_linear(x, q).square().sum())(x)


def _jvp(q, x):
    return torch.func.jvp(lambda x: nf4_linear(x, q), (x,), (torch.ones_like(x),))[1]


def _forward_ad(q, x):
    with fwAD.dual_level():
        return fwAD.unpack_dual(nf4_linear(fwAD.make_dual(x, torch.ones_like(x)), q)).tangent


def _vmap_parts(q, x):
    return torch.func.vmap(lambda rows: nf4_linear_parts(rows, [q, q])[1])(x[:, None])[:, 0]


TRANSFORMS = {
    "vmap": (_vmap, lambda x, w: x @ w.T),
    "grad": (_grad, lambda x, w: 2 * (x @ w.T) @ w),
    "jvp": (_jvp, lambda x, w: torch.ones_like(x) @ w.T),
    "forward_ad": (_forward_ad, lambda x, w: torch.ones_like(x) @ w.T),
    "vmap_parts": (_vmap_parts, lambda x, w: x @ w.T),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_torch_func_transforms_and_forward_ad_equal_the_float64_reference(device, mode, transform):
    run, expected = TRANSFORMS[transform]
    q, w = weight(device)
    x = torch.randn(5, K, device=device)
    with use_kernels(mode):
        out = run(q, x)
    assert out is not None, "the tangent was dropped"
    assert max_rel(out, expected(x.double(), w)) < 1e-5


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_forced_triton_refuses_transforms_and_forward_ad_in_one_line(device, transform):
    run, _ = TRANSFORMS[transform]
    q, _ = weight(device)
    with use_kernels("triton"), pytest.raises(ValueError, match=one_line("NF4LORA_KERNELS='triton' cannot run under")):
        run(q, torch.randn(5, K, device=device))


def test_auto_takes_the_reference_on_cuda_only_under_a_transform_or_forward_ad(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    seen = []
    with use_kernels("auto"):
        torch.func.vmap(lambda row: seen.append(dispatch.use_triton(cuda)) or row)(torch.ones(2, 3))
        with fwAD.dual_level():
            seen.append(dispatch.use_triton(cuda))
        seen.append(dispatch.use_triton(cuda))
    assert seen == [False, False, True]


def _x_of_layout(layout: str, rows: int, dtype, device) -> torch.Tensor:
    """x (2, rows, K) in ``layout``, its values fresh random."""
    if layout == "transposed":
        return torch.randn(K, rows, 2, dtype=dtype, device=device).permute(2, 1, 0)
    if layout == "every_other":
        return torch.randn(2, rows, 2 * K, dtype=dtype, device=device)[..., ::2]
    if layout == "expanded":
        return torch.randn(1, 1, K, dtype=dtype, device=device).expand(2, rows, K)
    return torch.randn(2 * rows * K + 3, dtype=dtype, device=device)[3:].view(2, rows, K)  # misaligned start


@pytest.mark.parametrize("layout", ["transposed", "every_other", "expanded", "offset"])
@pytest.mark.parametrize("rows", [1, 9])  # the fused kernels at 2 and 18 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_reads_x_of_any_layout_with_gradients_as_the_float64_reference(device, layout, rows, dtype):
    q, _ = weight(device)
    w = nf4_tensor.dequantize(q, dtype).double()
    x = _x_of_layout(layout, rows, dtype, device).requires_grad_()  # a leaf that keeps the layout's strides
    bias = torch.randn(N, device=device, requires_grad=True)
    grad_out = torch.randn(2, rows, N, dtype=dtype, device=device)
    with use_kernels("triton"):
        y = nf4_linear(x, q, bias)
        y.backward(grad_out)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert max_rel(y, x.detach().double() @ w.T + bias.detach().to(dtype).double()) < tol
    assert x.grad.shape == x.shape and max_rel(x.grad, grad_out.double() @ w) < tol
    assert max_rel(bias.grad, grad_out.double().sum((0, 1))) < tol
