"""The training path of a single LoRA adapter: base matmul and LoRA update in one autograd node.

``lora_linear(x, x_lora, weight, bias, A, B, scaling)`` computes

    y = x @ W.T + bias + scaling * (x_lora @ A.T) @ B.T

for x, x_lora (..., K), W (N, K) frozen (a dense tensor, or a ``QuantizedTensor`` dequantized on
the fly with ``nf4lora.kernels.dequantize``), A (r, K), B (N, r), all in one compute dtype, and
returns gradients for x, x_lora, bias, A and B. Compared with running the base layer and then
adding the update (``functional.lora_add``), it removes every (M, N) and (M, K) pass that is not a
matmul output:

- forward: the small product ``(xa * scaling) @ B.T (+ bias)`` is written first and the base GEMM
  accumulates onto it (``addmm_`` with beta=1, read in the GEMM's epilogue) -- no separate add;
- backward: ``grad_x = grad_y @ W`` accumulates onto ``grad_xa @ A`` the same way, instead of
  autograd summing two (M, K) gradients; when dropout is off, x_lora *is* x and that one GEMM
  produces the whole grad_x.

Saved for backward: x_lora (needed for grad_A), xa = x_lora @ A.T (M, r), A, B, and the weight
as given (the packed ``QuantizedTensor`` for NF4: dequantized again in backward, never stored).
"""

from __future__ import annotations

import torch

from nf4lora.kernels import dequantize
from nf4lora.nf4.tensor import QuantizedTensor


def dense_weight(weight: torch.Tensor | QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) dense weight in ``dtype``, outside autograd: a cast for tensors, a dequantization for NF4."""
    if isinstance(weight, QuantizedTensor):
        return dequantize(weight, dtype)
    return weight.detach().to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x @ W.T + bias + scaling * x_lora @ A.T @ B.T; no gradient to W."""

    @staticmethod
    def forward(ctx, x, x_lora, weight_t, qweight, bias, lora_a, lora_b, scaling):
        # weight_t: the dense weight (a tensor input, so autograd tracks its version) or None for NF4;
        # qweight: the QuantizedTensor or None.
        weight = weight_t if qweight is None else qweight
        x2d = x.reshape(-1, x.shape[-1])
        xl2d = x2d if x_lora is x else x_lora.reshape(-1, x_lora.shape[-1])
        xa = xl2d @ lora_a.t()  # (M, r)
        b_scaled = lora_b * scaling
        # Allocated in its final shape and filled through a 2-D view, so the output is not a view
        # (a later adapter may then add into it in place).
        y = x.new_empty(*x.shape[:-1], lora_b.shape[0])
        y2d = y.view(-1, y.shape[-1])
        if bias is None:
            torch.mm(xa, b_scaled.t(), out=y2d)
        else:
            torch.addmm(bias, xa, b_scaled.t(), out=y2d)
        y2d.addmm_(x2d, dense_weight(weight, x.dtype).t())
        ctx.shared_input = x_lora is x
        ctx.qweight = qweight
        ctx.scaling = scaling
        ctx.shapes = (x.shape, x_lora.shape)
        ctx.save_for_backward(xl2d, xa, weight_t, lora_a, b_scaled)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xl2d, xa, weight_t, lora_a, b_scaled = ctx.saved_tensors
        weight = weight_t if ctx.qweight is None else ctx.qweight
        g2d = grad_y.reshape(-1, grad_y.shape[-1])
        needs_x, needs_xl, _, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        grad_x = grad_xl = grad_bias = grad_a = grad_b = None
        g_xa = g2d @ b_scaled  # (M, r): grad of xa, the scaling folded into B
        if needs_b:
            grad_b = (g2d.t() @ xa).mul_(ctx.scaling)
        if needs_a:
            grad_a = g_xa.t() @ xl2d
        if needs_bias:
            grad_bias = g2d.sum(0)
        x_shape, xl_shape = ctx.shapes
        lora_gx = g_xa @ lora_a if (needs_xl or (needs_x and ctx.shared_input)) else None
        if needs_x:
            w = dense_weight(weight, g2d.dtype)
            if ctx.shared_input:
                grad_x = lora_gx.addmm_(g2d, w).view(x_shape)
            else:
                grad_x = (g2d @ w).view(x_shape)
        if needs_xl and not ctx.shared_input:
            grad_xl = lora_gx.view(xl_shape)
        return grad_x, grad_xl, None, None, grad_bias, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    weight: torch.Tensor | QuantizedTensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * x_lora @ A.T @ B.T`` with gradients to x, x_lora, bias, A, B.

    x, x_lora: (..., K); weight: (N, K) frozen dense tensor or ``QuantizedTensor``; bias: (N,) or None;
    lora_a: (r, K); lora_b: (N, r). All tensors in one compute dtype (x.dtype); pass ``x_lora=x``
    (the same object) when there is no dropout, so that grad_x comes out of a single GEMM.
    Returns (..., N) in x.dtype.
    """
    tensors = {"x_lora": x_lora, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    if isinstance(weight, torch.Tensor):
        tensors["weight"] = weight
    wrong = {k: t.dtype for k, t in tensors.items() if t.dtype != x.dtype}
    if wrong:
        raise TypeError(f"lora_linear needs one compute dtype, x is {x.dtype} but {wrong}")
    if isinstance(weight, QuantizedTensor):
        return LoraLinearFunction.apply(x, x_lora, None, weight, bias, lora_a, lora_b, scaling)
    return LoraLinearFunction.apply(x, x_lora, weight.detach(), None, bias, lora_a, lora_b, scaling)
