"""Dispatching entry points and the ``nf4_linear`` autograd Function.

``nf4_linear(x, qweight, bias)`` computes ``x @ dequant(W).T + bias`` for x (..., K) and a
``QuantizedTensor`` W (N, K). Paths, chosen per call by ``dispatch.use_triton`` and M = rows of x:

- reference: ``linear_reference`` (dequantize, then ``F.linear`` in x.dtype);
- Triton, M <= ``SMALL_M_MAX`` and ``gemv_nf4.supports(K, blocksize)``: the fused split-K kernels
  in ``gemv_nf4`` (weight streamed once, bias fused);
- Triton, larger M: ``matmul_nf4.dequant_matmul`` (dequantize into a reused buffer, then cuBLAS),
  which measured 2.3-3.0x faster than the fused tensor-core kernel at M = 4096 on an H200
  (benchmarks/results/2026-11-28_kernels-calling-thread_h200.md).

``nf4_linear_parts(x, [W_0, W_1, ...])`` is ``[nf4_linear(x, W) for W in ...]`` for projections that read
the same x (q/k/v, gate/up): at M = 1 or 2 with nothing to differentiate, one launch of
``gemv_nf4.fused_matmul_parts`` streams all the weights.

Note: backward saves only the ``QuantizedTensor`` (packed bytes and its small state), never a
dequantized copy; grad_input dequantizes again. The frozen weight never receives a gradient.
"""

from __future__ import annotations

import torch

from nf4lora.kernels.dispatch import (
    FLOAT_DTYPES, autocast_dtype, kernel_mode, transform_active, use_kernels, use_triton,
)
from nf4lora.kernels.reference import dequantize_reference, linear_reference, quantize_reference
from nf4lora.nf4.blockwise import check_float_input
from nf4lora.nf4.tensor import QuantizedTensor

# Rows of x up to which the fused kernels beat dequantize + cuBLAS. Measured on an H200
# (benchmarks/results/2026-11-28_kernels-calling-thread_h200.md, bf16, Llama projections): the fused kernels
# take 0.0085-0.105 ms at M = 1..16 against 0.022-0.27 ms for dequantize + cuBLAS, at every M and shape.
SMALL_M_MAX = 16


def quantize(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    code: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to a ``QuantizedTensor``; bytes equal ``nf4lora.nf4.quantize``."""
    if not isinstance(w, torch.Tensor):
        check_float_input(w, "weight")  # raises, naming the type
    options = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant, code=code)
    if use_triton(w.device):
        from nf4lora.kernels.quantize_nf4 import quantize_triton

        return quantize_triton(w, **options)
    return quantize_reference(w, **options)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None, bulk_store: bool = True) -> torch.Tensor:
    """Dequantize ``q`` to ``dtype`` (default ``q.dtype``), shape ``q.shape``; exactly equal to the reference.

    ``bulk_store=False`` makes the Triton kernel write with plain stores instead of TMA: more GPU time, less host
    time (``dequantize_nf4.dequantize_into``); for callers bound by host time. The reference ignores it.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if use_triton(q.device):
        from nf4lora.kernels.dequantize_nf4 import dequantize_triton

        return dequantize_triton(q, dtype, bulk_store)
    return dequantize_reference(q, dtype)


def _linear_forward(x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x2d.shape[0] == 0:  # an empty batch: nothing to launch (the kernels size their grids by rows)
        return x2d.new_empty(0, qweight.shape[0])
    if not use_triton(x2d.device):
        return linear_reference(x2d, qweight, bias)
    if x2d.shape[0] <= SMALL_M_MAX:
        from nf4lora.kernels.gemv_nf4 import gemv_nf4, supports

        if supports(x2d.shape[1], qweight.state.blocksize):
            return gemv_nf4(x2d, qweight, bias)
    from nf4lora.kernels.matmul_nf4 import dequant_matmul

    return dequant_matmul(x2d, qweight, bias)


def _linear(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``_linear_forward`` on x (..., K) flattened to 2-D; returns (..., N)."""
    return _linear_forward(x.reshape(-1, x.shape[-1]), qweight, bias).reshape(*x.shape[:-1], qweight.shape[0])


def _linear_grad_input(grad2d: torch.Tensor, qweight: QuantizedTensor) -> torch.Tensor:
    """grad (M, N) @ dequant(W) (N, K) -> (M, K), dequantizing W again."""
    if grad2d.shape[0] == 0:
        return grad2d.new_empty(0, qweight.shape[1])
    if not use_triton(grad2d.device):
        return grad2d @ dequantize_reference(qweight, grad2d.dtype)
    if torch.is_grad_enabled():
        # backward(create_graph=True) records this product for a double backward, which keeps its weight: a
        # weight of its own, as the next layer's dequantization overwrites the shared workspace
        return grad2d @ dequantize(qweight, grad2d.dtype, bulk_store=False)
    from nf4lora.kernels.matmul_nf4 import dequant_matmul

    return dequant_matmul(grad2d, qweight, None, transpose=False)


class NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W).T + bias; gradients for x and bias only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, qweight: QuantizedTensor) -> torch.Tensor:
        ctx.qweight = qweight
        ctx.bias_dtype = None if bias is None else bias.dtype
        # backward may run on autograd's worker thread, which a thread-local ``use_kernels`` block does not reach
        ctx.kernel_mode = kernel_mode()
        return _linear(x, qweight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            with use_kernels(ctx.kernel_mode):
                grad_x = _linear_grad_input(grad2d, ctx.qweight)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], ctx.qweight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_bias = grad2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must be (..., in_features), got a 0-d tensor")


def _check_same_device(name: str, t: torch.Tensor, other_name: str, other: torch.device) -> None:
    if t.device != other:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other}; move both to one device")


def check_linear_args(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None) -> None:
    """Refuse in one line what ``nf4_linear`` cannot compute, before any path (or Triton) trips over it."""
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a QuantizedTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be 2-D (out_features, in_features), got shape {tuple(qweight.shape)}")
    _check_x(x)
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, expected in_features={qweight.shape[1]}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; valid: float32, float16, bfloat16")
    _check_same_device("x", x, "qweight", qweight.device)
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (qweight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({qweight.shape[0]},)")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias has dtype {bias.dtype}; valid: float32, float16, bfloat16")
    _check_same_device("bias", bias, "x", x.device)


def nf4_linear(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` with autograd to x and bias.

    x: (..., K) fp32/fp16/bf16; qweight: ``QuantizedTensor`` of shape (N, K) on x's device; bias: (N,) fp32/fp16/bf16
    or None.
    Returns (..., N) in x.dtype. The compute dtype is x.dtype (the weight is dequantized to it); under
    ``torch.autocast`` it is autocast's dtype, to which x and bias are cast first (``dispatch.autocast_dtype``).
    Under torch.func transforms and forward-mode AD it runs the reference in ``auto`` mode and raises in ``triton``
    mode (``dispatch.transform_active``); double backward is supported on every path.
    """
    check_linear_args(x, qweight, bias)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return nf4_linear(x.to(dtype), qweight, None if bias is None else bias.to(dtype))
    if transform_active():
        # torch.func refuses an autograd Function without setup_context, so the plain ops of the reference
        # (use_triton chooses it here) carry the transform
        return _linear(x, qweight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return NF4LinearFunction.apply(x, bias, qweight)
    # Nothing to differentiate (inference, or a frozen input): skip the autograd node, whose setup costs
    # about as much host time as a kernel launch.
    return _linear(x, qweight, bias)


def nf4_linear_parts(x: torch.Tensor, qweights: list[QuantizedTensor]) -> list[torch.Tensor]:
    """``[nf4_linear(x, W) for W in qweights]`` (no bias), as one fused launch where it can be.

    x: (..., K); qweights: ``QuantizedTensor`` (N_p, K). Returns [(..., N_p)] in x.dtype (autocast's dtype under
    ``torch.autocast``, as ``nf4_linear``), views of one buffer on the fused path. That path takes the Triton
    route with 1 or 2 rows of x, no autograd to x, and weights that ``gemv_nf4.parts_supported`` accepts;
    anything else makes one ``nf4_linear`` call per weight.
    """
    _check_x(x)
    if isinstance(qweights, QuantizedTensor):
        raise TypeError("qweights must be a list of QuantizedTensor, got QuantizedTensor")
    dtype = autocast_dtype(x.device)
    if dtype is not None and x.dtype in FLOAT_DTYPES:  # as nf4_linear casts; another dtype goes on to its refusal
        with torch.autocast(x.device.type, enabled=False):
            return nf4_linear_parts(x.to(dtype), qweights)
    x2d = x.reshape(-1, x.shape[-1])
    if use_triton(x.device) and not (torch.is_grad_enabled() and x.requires_grad):
        from nf4lora.kernels.gemv_nf4 import fused_matmul_parts, parts_supported

        if all(isinstance(q, QuantizedTensor) for q in qweights) and parts_supported(x2d, qweights):
            rows = [q.shape[0] for q in qweights]
            out = fused_matmul_parts(x2d, qweights)
            return [part.reshape(*x.shape[:-1], n) for part, n in zip(out.split(rows, dim=1), rows)]
    return [nf4_linear(x, q) for q in qweights]
