"""The fused in-place LoRA update against its plain-autograd reference, and DoRA's norm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nf4lora.lora.functional import dora_weight_norm, lora_add, lora_add_reference, lora_delta_weight

from lora_helpers import err_vs_magnitude, rel_err


def _operands(lead: tuple[int, ...], k: int, n: int, r: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(*lead, n, generator=g).to(dtype)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    return [t.requires_grad_() for t in (y, x, a, b)]


def _run(fn, operands, grad_out, scaling):
    y, x, a, b = [t.detach().clone().requires_grad_() for t in operands]
    # lora_add writes into its first argument, which must not be a leaf: route it through an identity op.
    out = fn(y * 1, x, a, b, scaling)
    out.backward(grad_out)
    return out.detach(), y.grad, x.grad, a.grad, b.grad


@settings(max_examples=25, deadline=None)
@given(
    lead=st.sampled_from([(1,), (7,), (2, 5), (3, 1, 4)]),
    k=st.integers(1, 33), n=st.integers(1, 29), r=st.integers(1, 9),
    scaling=st.sampled_from([0.5, 2.0, 1 / 3**0.5]),
)
def test_lora_add_matches_reference_forward_and_every_gradient_fp32(lead, k, n, r, scaling):
    ops = _operands(lead, k, n, r, torch.float32)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(2))
    fused = _run(lora_add, ops, grad_out, scaling)
    ref = _run(lora_add_reference, ops, grad_out, scaling)
    magnitude = _run(lora_add_reference, [t.detach().abs() for t in ops], grad_out.abs(), scaling)
    for got, want, scale in zip(fused, ref, magnitude):
        # fp32, same products in a different association order ((x@A.T)@B.T vs fused addmm): a few ulps of the
        # summed terms' magnitude (hypothesis finds one-element outputs whose terms cancel, so not of the output)
        assert err_vs_magnitude(got, want, scale) < 1e-6


def test_lora_add_bf16_matches_fp32_reference_to_bf16_precision():
    ops = _operands((4, 37), 96, 80, 16, torch.float32, seed=3)
    grad_out = torch.randn(4, 37, 80, generator=torch.Generator().manual_seed(4))
    ref = _run(lora_add_reference, ops, grad_out, 2.0)
    fused = _run(lora_add, [t.bfloat16() for t in ops], grad_out.bfloat16(), 2.0)
    for got, want in zip(fused, ref):
        # bf16 has an 8-bit mantissa (2^-8 = 3.9e-3 per rounding); outputs and grads round a handful of times.
        assert rel_err(got.float(), want) < 1.6e-2


def test_lora_add_without_grad_writes_into_the_base_output():
    y, x, a, b = (t.detach() for t in _operands((5,), 12, 10, 3, torch.float32))
    expected = lora_add_reference(y, x, a, b, 0.5)
    out = lora_add(y, x, a, b, 0.5)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # fp32, reassociated sum


def test_lora_add_rejects_mixed_dtypes():
    y, x, a, b = (t.detach() for t in _operands((5,), 12, 10, 3, torch.float32))
    with pytest.raises(TypeError, match=r"one compute dtype, got y torch.float32, x torch.bfloat16"):
        lora_add(y, x.bfloat16(), a, b, 1.0)


def test_dora_weight_norm_is_the_row_norm_of_the_merged_weight_and_detached():
    g = torch.Generator().manual_seed(5)
    w, a, b = torch.randn(9, 13, generator=g), torch.randn(3, 13, generator=g), torch.randn(9, 3, generator=g)
    a.requires_grad_()
    norm = dora_weight_norm(w.bfloat16(), a, b, 0.25)
    expected = torch.stack([(w.bfloat16().float()[i] + 0.25 * b[i] @ a.detach()).norm() for i in range(9)])
    assert not norm.requires_grad and norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)  # fp32 sums of 13 squares, reordered
    torch.testing.assert_close(lora_delta_weight(a, b, 0.25), 0.25 * b @ a.detach(), rtol=1e-6, atol=1e-7)
