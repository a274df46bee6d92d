"""The training path of a single LoRA adapter: base matmul and LoRA update in one autograd node.

``lora_linear(x, x_lora, weight, bias, A, B, scaling)`` computes

    y = x @ W.T + bias + scaling * (x_lora @ A.T) @ B.T

for x, x_lora (..., K), W (N, K) frozen (a dense tensor, or a ``QuantizedTensor`` dequantized on
the fly with ``nf4lora.kernels.dequantize``), A (r, K), B (N, r), and returns gradients for x,
x_lora, bias, A and B. The matmuls run in x.dtype; A and B may be stored in another (fp32 by
default) and are cast inside the node, so a step records one autograd node per layer; on CUDA their
gradients come out of the GEMMs in fp32 (``out_dtype``, fp32 accumulators unrounded). Compared
with running the base layer and then adding the update (``functional.lora_add``), it removes
every (M, N) and (M, K) pass that is not a matmul output:

- forward: the small product ``scaling * xa @ B.T (+ bias)`` is written first and the base GEMM
  accumulates onto it (``addmm_`` with beta=1, read in the GEMM's epilogue) -- no separate add;
  ``scaling`` rides in the GEMMs' alpha, never as a pass of its own;
- backward: ``grad_x = grad_y @ W`` accumulates onto ``grad_xa @ A`` the same way, instead of
  autograd summing two (M, K) gradients; when dropout is off, x_lora *is* x and that one GEMM
  produces the whole grad_x.

Every op counts: at 4096 x 4096 a step is bound by host time, not by the GPU (about 10 us per
launch on the H200 machine's host), so the node issues 8 ops forward and 7 backward; on CUDA the
engine adds no casts after it (A's and B's gradients already arrive in fp32).

Saved for backward: x_lora (needed for grad_A), xa = x_lora @ A.T (M, r), A and B (as stored and as cast), and the
weight as given (the packed ``QuantizedTensor`` for NF4: dequantized again in backward, never stored). A backward
with ``create_graph=True`` recomputes xa and the casts inside autograd, so second derivatives are the plain formula's.
"""

from __future__ import annotations

import torch

from nf4lora.kernels import dequantize
from nf4lora.kernels.dispatch import autocast_dtype, kernel_mode, use_kernels
from nf4lora.nf4.tensor import QuantizedTensor


def dense_weight(weight: torch.Tensor | QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) dense weight in ``dtype``, outside autograd: a cast for tensors, a dequantization for NF4."""
    if isinstance(weight, QuantizedTensor):
        return dequantize(weight, dtype, bulk_store=False)  # plain stores: a LoRA step is bound by host time
    return weight.detach().to(dtype)


# mm/addmm's ``out_dtype`` overloads (fp32 output from 16-bit operands, CUDA only; pytorch#150812, 2025)
_HAS_OUT_DTYPE = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def _wide_grad_gemms(grad: torch.Tensor, lora_dtype: torch.dtype | None) -> bool:
    """Whether mm/addmm can write fp32 outputs from ``grad``'s 16-bit operands (``out_dtype``)."""
    wide = grad.is_cuda and lora_dtype == torch.float32 and grad.dtype in (torch.float16, torch.bfloat16)
    return wide and _HAS_OUT_DTYPE


class LoraLinearFunction(torch.autograd.Function):
    """y = x @ W.T + bias + scaling * x_lora @ A.T @ B.T; no gradient to W."""

    @staticmethod
    def forward(ctx, x, x_lora, weight_t, qweight, bias, lora_a, lora_b, scaling):
        # weight_t: the dense weight (a tensor input, so autograd tracks its version) or None for NF4;
        # qweight: the QuantizedTensor or None. A and B arrive in their storage dtype and are cast here,
        # outside autograd: their gradients come back in their dtype, without a graph node per cast.
        weight = weight_t if qweight is None else qweight
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        xl2d = x2d if x_lora is x else x_lora.reshape(-1, x_lora.shape[-1])
        xa = xl2d @ a.t()  # (M, r)
        # Allocated in its final shape and filled through a 2-D view, so the output is not a view
        # (a later adapter may then add into it in place).
        y = x.new_empty(*x.shape[:-1], b.shape[0])
        y2d = y.view(-1, y.shape[-1])
        if bias is None:  # beta=0: y's uninitialised contents are ignored, NaNs included
            y2d.addmm_(xa, b.t(), beta=0, alpha=scaling)
        else:
            torch.addmm(bias, xa, b.t(), alpha=scaling, out=y2d)
        y2d.addmm_(x2d, dense_weight(weight, x.dtype).t())
        ctx.shared_input = x_lora is x
        ctx.qweight = qweight
        ctx.kernel_mode = kernel_mode()  # for backward, which may run on a thread a ``use_kernels`` block misses
        ctx.scaling = scaling
        ctx.lora_dtype = lora_a.dtype if lora_b.dtype == lora_a.dtype else None
        ctx.shapes = (x.shape, x_lora.shape)
        ctx.save_for_backward(x_lora, xa, weight_t, a, b, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, xa, weight_t, a, b, lora_a, lora_b = ctx.saved_tensors
        xl2d = x_lora.reshape(-1, x_lora.shape[-1])
        if torch.is_grad_enabled():
            # backward(create_graph=True): xa and the casts were made outside autograd; redone from the inputs, the
            # gradients below carry their terms into a second derivative
            a, b = lora_a.to(a.dtype), lora_b.to(b.dtype)
            xa = xl2d @ a.t()
        weight = weight_t if ctx.qweight is None else ctx.qweight
        scaling = ctx.scaling
        g2d = grad_y.reshape(-1, grad_y.shape[-1])
        needs_x, needs_xl, _, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        grad_x = grad_xl = grad_bias = grad_a = grad_b = None
        # (M, r): grad of xa. beta=0 makes the first argument a shape donor only.
        g_xa = torch.addmm(xa, g2d, b, beta=0, alpha=scaling)
        # A and B's gradients straight from the fp32 accumulators where cuBLAS can write them (no
        # rounding to x.dtype, no cast node); elsewhere in x.dtype, cast back by the engine
        grad_dtype = {"out_dtype": ctx.lora_dtype} if _wide_grad_gemms(g2d, ctx.lora_dtype) else {}
        if needs_b:
            grad_b = torch.addmm(b, g2d.t(), xa, beta=0, alpha=scaling, **grad_dtype)
        if needs_a:
            grad_a = torch.mm(g_xa.t(), xl2d, **grad_dtype)
        if needs_bias:
            grad_bias = g2d.sum(0)
        x_shape, xl_shape = ctx.shapes
        lora_gx = g_xa @ a if (needs_xl or (needs_x and ctx.shared_input)) else None
        if needs_x:
            with use_kernels(ctx.kernel_mode):
                w = dense_weight(weight, g2d.dtype)
            if ctx.shared_input:
                grad_x = lora_gx.addmm_(g2d, w).view(x_shape)
            else:
                grad_x = (g2d @ w).view(x_shape)
        if needs_xl and not ctx.shared_input:
            grad_xl = lora_gx.view(xl_shape)
        return grad_x, grad_xl, None, None, grad_bias, grad_a, grad_b, None


def check_shapes(x, x_lora, weight, bias, lora_a, lora_b) -> None:
    """Raise a one-line ValueError unless x, x_lora (..., K), weight (N, K), bias (N,) or None, lora_a (r, K) and
    lora_b (N, r) fit together (N and K read from the weight, r from lora_a); x_lora must have x's shape, not just
    its number of rows. One chain of comparisons when they fit: it runs on every layer of every step."""
    n, k = weight.shape if len(weight.shape) == 2 else (-1, -1)
    r = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if (x.shape[-1:] == (k,) and x_lora.shape == x.shape and lora_a.shape == (r, k) and lora_b.shape == (n, r)
            and (bias is None or bias.shape == (n,))):
        return
    wrong = {name: tuple(t.shape) for name, t in (("weight", weight), ("lora_a", lora_a)) if len(t.shape) != 2}
    if not wrong:
        expected = {"x": (*x.shape[:-1], k), "x_lora": x.shape, "lora_a": (r, k), "lora_b": (n, r), "bias": (n,)}
        operands = {"x": x, "x_lora": x_lora, "lora_a": lora_a, "lora_b": lora_b, "bias": bias}
        wrong = {
            name: tuple(t.shape) for name, t in operands.items() if t is not None and t.shape != expected[name]
        }
    raise ValueError(f"lora_linear got shapes {wrong} for a weight of shape {tuple(weight.shape)}; expected "
                     "weight (N, K), x and x_lora (..., K) of one shape, bias (N,), lora_a (r, K), lora_b (N, r)")


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

    x, x_lora: (..., K); weight: (N, K) frozen dense tensor or ``QuantizedTensor``; bias: (N,) or None,
    all in one compute dtype (x.dtype). lora_a: (r, K) and lora_b: (N, r) in any float dtype (their
    storage dtype, fp32 by default): the matmuls run in x.dtype and their gradients come back in
    theirs. Pass ``x_lora=x`` (the same object) when there is no dropout, so that grad_x comes out
    of a single GEMM. Returns (..., N) in x.dtype; under ``torch.autocast``, x, x_lora, bias and a dense weight are
    cast to autocast's dtype first and the result is in that dtype (``dispatch.autocast_dtype``). Operands of other
    shapes raise ValueError (``check_shapes``). Supports double backward.
    """
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            casts = [xc if x_lora is x else x_lora.to(dtype)]
            casts += [t if t is None or isinstance(t, QuantizedTensor) else t.to(dtype) for t in (weight, bias)]
            return lora_linear(xc, *casts, lora_a, lora_b, scaling)
    check_shapes(x, x_lora, weight, bias, lora_a, lora_b)
    dense = weight if isinstance(weight, torch.Tensor) else None
    wrong = {
        name: t.dtype for name, t in (("x_lora", x_lora), ("bias", bias), ("weight", dense))
        if t is not None and t.dtype != x.dtype
    }
    if wrong:
        raise TypeError(f"lora_linear needs one compute dtype, x is {x.dtype} but {wrong}")
    if dense is None:
        return LoraLinearFunction.apply(x, x_lora, None, weight, bias, lora_a, lora_b, scaling)
    return LoraLinearFunction.apply(x, x_lora, dense.detach(), None, bias, lora_a, lora_b, scaling)
