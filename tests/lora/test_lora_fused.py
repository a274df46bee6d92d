"""The fused base + LoRA Function against plain autograd ops, on dense and NF4 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_helpers import err_vs_magnitude, rel_err
from nf4lora.lora.functional import lora_add_reference
from nf4lora.lora.fused import lora_linear
from nf4lora.nf4.tensor import quantize


def _case(lead, k, n, r, *, nf4, bias, shared, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    weight = quantize(w, blocksize=64) if nf4 else w.to(dtype)
    dense_w = weight.dequantize(torch.float32) if nf4 else w
    x = torch.randn(*lead, k, generator=g)
    x_lora = x if shared else x * (torch.rand(*lead, k, generator=g) > 0.3) / 0.7  # a dropout-like input
    leaves = {
        "x": x, "x_lora": x_lora, "a": torch.randn(r, k, generator=g) / k**0.5, "b": torch.randn(n, r, generator=g),
    }
    if bias:
        leaves["bias"] = torch.randn(n, generator=g)
    grad_out = torch.randn(*lead, n, generator=g)
    return weight, dense_w, leaves, grad_out


def _run_fused(weight, leaves, grad_out, scaling, shared, dtype):
    t = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items() if k != "x_lora"}
    x_lora = t["x"] if shared else leaves["x_lora"].detach().to(dtype).requires_grad_()
    y = lora_linear(t["x"], x_lora, weight, t.get("bias"), t["a"], t["b"], scaling)
    y.backward(grad_out.to(dtype))
    grads = {k: v.grad for k, v in t.items()}
    if not shared:
        grads["x_lora"] = x_lora.grad
    return y.detach(), grads


def _run_reference(dense_w, leaves, grad_out, scaling, shared):
    t = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if k != "x_lora"}
    x_lora = t["x"] if shared else leaves["x_lora"].detach().clone().requires_grad_()
    y = lora_add_reference(F.linear(t["x"], dense_w, t.get("bias")), x_lora, t["a"], t["b"], scaling)
    y.backward(grad_out)
    grads = {k: v.grad for k, v in t.items()}
    if not shared:
        grads["x_lora"] = x_lora.grad
    return y.detach(), grads


@settings(max_examples=20, deadline=None)
@given(
    lead=st.sampled_from([(1,), (9,), (2, 5)]), k=st.integers(1, 70), n=st.integers(1, 40), r=st.integers(1, 8),
    nf4=st.booleans(), bias=st.booleans(), shared=st.booleans(), scaling=st.sampled_from([0.5, 2.0]),
)
def test_fused_lora_linear_matches_plain_autograd_forward_and_every_gradient(lead, k, n, r, nf4, bias, shared, scaling):
    weight, dense_w, leaves, grad_out = _case(lead, k, n, r, nf4=nf4, bias=bias, shared=shared)
    y, grads = _run_fused(weight, leaves, grad_out, scaling, shared, torch.float32)
    y_ref, grads_ref = _run_reference(dense_w, leaves, grad_out, scaling, shared)
    abs_leaves = {k: v.abs() for k, v in leaves.items()}
    y_mag, grads_mag = _run_reference(dense_w.abs(), abs_leaves, grad_out.abs(), scaling, shared)
    # fp32, same products in another association order (the update is accumulated into the GEMM): a few ulps of
    # the summed terms' magnitude (hypothesis finds tiny outputs whose terms cancel, so not of the output itself)
    assert err_vs_magnitude(y, y_ref, y_mag) < 1e-6
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        assert err_vs_magnitude(grads[key], grads_ref[key], grads_mag[key]) < 1e-6, key


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fused_lora_linear_in_bf16_matches_the_fp32_reference_to_bf16_precision(nf4):
    weight, dense_w, leaves, grad_out = _case((3, 17), 96, 72, 16, nf4=nf4, bias=True, shared=True,
                                              dtype=torch.bfloat16, seed=3)
    # The reference gets the weight the bf16 path multiplies by (rounded to bf16), in fp32.
    dense_w = weight.dequantize(torch.bfloat16).float() if nf4 else weight.float()
    y, grads = _run_fused(weight, leaves, grad_out, 2.0, True, torch.bfloat16)
    y_ref, grads_ref = _run_reference(dense_w, leaves, grad_out, 2.0, True)
    # bf16 operands and outputs (2^-8 relative per rounding), fp32 accumulation inside each GEMM.
    assert rel_err(y, y_ref) < 1e-2
    for key in grads_ref:
        assert rel_err(grads[key], grads_ref[key]) < 1e-2, key


def test_fused_output_is_not_a_view_and_the_dense_weight_gets_no_gradient():
    weight = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = lora_linear(x, x, weight, None, torch.randn(2, 5), torch.randn(6, 2), 1.0)
    assert y.shape == (2, 3, 6) and not y._is_view()
    y.sum().backward()
    assert weight.grad is None and x.grad is not None


def test_fused_lora_linear_rejects_mixed_dtypes_naming_them():
    x = torch.randn(3, 5)
    with pytest.raises(TypeError, match=r"x is torch.float32 but \{'bias': torch.bfloat16\}"):
        lora_linear(x, x, torch.randn(6, 5), torch.randn(6).bfloat16(), torch.randn(2, 5), torch.randn(6, 2), 1.0)
