"""RMSNorm in one launch for inference, optionally adding the residual first.

``rms_norm(x, weight, eps)`` equals the model's ``RMSNorm`` (transformers' formula)::

    normed = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)
    out = weight * normed            # torch's type promotion: bf16 weight -> bf16, fp32 weight -> fp32

``add_rms_norm(x, delta, weight, eps)`` returns ``(x + delta, rms_norm(x + delta))`` with the sum rounded to
x.dtype first, as the eager ``x = x + delta`` rounds it: a decoder layer's residual add and the next norm.

Why: eagerly that is five kernels (the add, the cast to float32, ``rms_norm``, the cast back, the weight
product), each a few microseconds of launch-to-launch time in a replayed decode step of 100-135 us per
Llama-2-7B layer on an H200. One program per row keeps the whole row (the hidden size, up to
``MAX_FEATURES``) in registers, statistics in float32. No autograd: the model calls these only when nothing
needs a gradient. The sum of squares runs in another order than torch's, so outputs may differ from the
reference in the last bit of x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import FLOAT_DTYPES, next_power_of_2
from nf4lora.kernels import pdl
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.kernels.pdl import release_dependents, wait_for_producer

MAX_FEATURES = 32768


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, weight_ptr, out_ptr, sum_ptr, D, stride_x, stride_delta, stride_out, stride_sum, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Row program: out[row] = weight * normed(x[row] (+ delta[row])); with HAS_DELTA also sum[row] = x + delta."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    wait_for_producer(PDL)
    release_dependents(PDL)  # the next kernel (a GEMV) may start streaming its weights
    x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=live, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=live)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=live)


_launch = CachedLaunch(_rms_norm_kernel)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_norm(x)`` in PyTorch: the model's ``RMSNorm`` formula."""
    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def supports(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these: fp32/fp16/bf16 x (..., D) with D <= MAX_FEATURES and a weight (D,) on its
    device, and a delta of x's shape and dtype."""
    d = x.shape[-1] if x.dim() else 0
    return (
        x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES and 0 < d <= MAX_FEATURES and x.numel() > 0
        and tuple(weight.shape) == (d,) and weight.device == x.device
        and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype and delta.device == x.device))
    )


def rows_2d(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows, row_stride) for t (..., D): a tensor whose rows of D unit-stride values lie row_stride elements
    apart, t itself when contiguous, else a (rows, D) view or copy."""
    if t.is_contiguous():
        return t, t.shape[-1]
    t2d = t.reshape(-1, t.shape[-1])
    t2d = t2d if t2d.stride(-1) == 1 else t2d.contiguous()
    return t2d, t2d.stride(0)


def _run(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    if not supports(x, weight, delta):
        given = {"x": x, "weight": weight, "delta": delta}
        raise ValueError(
            f"rms_norm takes non-empty fp32/fp16/bf16 x (..., D), D <= {MAX_FEATURES}, a (D,) weight and a delta like "
            f"x, on one device; got "
            + ", ".join(f"{n} {tuple(t.shape)} {t.dtype} {t.device}" for n, t in given.items() if t is not None)
        )
    d = x.shape[-1]
    rows = x.numel() // d
    x_rows, x_stride = rows_2d(x)
    delta_rows, delta_stride = (x_rows, x_stride) if delta is None else rows_2d(delta)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = out if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = next_power_of_2(d)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    launch = pdl.launch_meta(x.device)
    key = (rows, d, x_stride, delta_stride, x.dtype, weight.dtype, delta is None)
    _launch(
        lambda meta: (rows,), key, x_rows, delta_rows, weight, out, total, d, x_stride, delta_stride, d, d,
        float(eps), HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        **launch,
    )
    return total, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_norm(x)`` for x (..., D) fp32/fp16/bf16 and weight (D,); returns x's shape in
    promote_types(weight.dtype, x.dtype)."""
    return _run(x, None, weight, eps)[1]


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta, weight, eps)) in one pass; x and delta (..., D) of one dtype."""
    return _run(x, delta, weight, eps)
