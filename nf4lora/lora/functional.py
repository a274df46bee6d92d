"""The LoRA and DoRA update on top of a base layer's output.

LoRA: ``y = base(x) + (dropout(x) @ A.T @ B.T) * scaling``, with
x (..., K), A (r, K), B (N, r), y (..., N). All matmuls run in the compute dtype (y.dtype, the
base layer's output dtype); A and B are stored in their own dtype (fp32 by default) and cast on
the way in, so their gradients come back in that dtype through autograd.

``lora_add`` adds the update onto an existing output -- the base layer's at inference, or the
previous adapter's when several are active -- with one ``addmm`` written in place where autograd
allows it. Its autograd Function saves only the LoRA input and the (M, r) product ``xa = x @ A.T``
and reads grad_y twice in backward (for grad_B and ``grad_y @ B``) without any (M, N) temporary.
The single-adapter training path fuses further, into the base matmul itself (``fused.py``).
``lora_add_reference`` is the same math in plain autograd ops; tests hold them equal.

DoRA (``dora_update``) follows peft's formulation: with the merged weight
``W' = W + scaling * B @ A`` and ``n = ||W'||_2`` per output row, detached from the graph,
``y = base(x) + (m / n - 1) * base_nobias + (m / n) * lora(x)``, where ``base_nobias`` is the base
output without its bias (recomputed on the dropped-out input while dropout is active, as peft does).
The norm is computed in fp32 from the dense (for NF4: dequantized) base weight.
"""

from __future__ import annotations

import torch

from nf4lora.kernels.dispatch import autocast_dtype


class LoraAddFunction(torch.autograd.Function):
    """y + scaling * (x_lora @ A.T) @ B.T as one addmm: in place into y (marked dirty) unless y is a view."""

    @staticmethod
    def forward(
        ctx, y: torch.Tensor, x_lora: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        x2d = x_lora.reshape(-1, x_lora.shape[-1])
        xa = x2d @ lora_a.t()  # (M, r)
        out = _addmm_into(y, xa, lora_b, scaling)
        if out is y:
            ctx.mark_dirty(y)
        ctx.save_for_backward(x_lora, xa, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.x_shape = x_lora.shape
        return out

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_lora, xa, lora_a, lora_b = ctx.saved_tensors
        x2d = x_lora.reshape(-1, x_lora.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: xa, made outside autograd, redone inside for a 2nd derivative
            xa = x2d @ lora_a.t()
        g2d = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_a = grad_b = None
        # (M, r) = grad_y @ B * scaling: the only product of the wide grad_y needed for A and x.
        g_xa = (g2d @ lora_b).mul_(ctx.scaling)
        if ctx.needs_input_grad[3]:
            grad_b = (g2d.t() @ xa).mul_(ctx.scaling)
        if ctx.needs_input_grad[2]:
            grad_a = g_xa.t() @ x2d
        if ctx.needs_input_grad[1]:
            grad_x = (g_xa @ lora_a).view(ctx.x_shape)
        return grad_y, grad_x, grad_a, grad_b, None


def _addmm_into(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y + scaling * xa @ B.T``, written into y when autograd allows it (y contiguous and not a view).

    Note: an output of a custom autograd Function that is a view (e.g. ``nf4_linear`` reshaping its
    2-D result) may not be modified in place; those get one out-of-place addmm, which moves the same
    bytes and only costs a transient (M, N) allocation.
    """
    if y.is_contiguous() and not y._is_view():
        y.view(-1, y.shape[-1]).addmm_(xa, lora_b.t(), alpha=scaling)
        return y
    return torch.addmm(y.reshape(-1, y.shape[-1]), xa, lora_b.t(), alpha=scaling).view(y.shape)


def lora_add(y: torch.Tensor, x_lora: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """``y + scaling * x_lora @ A.T @ B.T`` for the base output y (..., N), in place when possible.

    x_lora: (..., K) in y.dtype; lora_a: (r, K) and lora_b: (N, r) in y.dtype (cast by the caller,
    so that autograd returns their gradients in the parameters' dtype). Returns the result, which
    is ``y`` itself when it was updated in place. Under ``torch.autocast`` the matmuls still run in y.dtype.
    Supports double backward.
    """
    if autocast_dtype(y.device) is not None:
        with torch.autocast(y.device.type, enabled=False):
            return lora_add(y, x_lora, lora_a, lora_b, scaling)
    if not (x_lora.dtype == lora_a.dtype == lora_b.dtype == y.dtype):
        raise TypeError(
            f"lora_add needs one compute dtype, got y {y.dtype}, x {x_lora.dtype}, A {lora_a.dtype}, B {lora_b.dtype}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, x_lora, lora_a, lora_b)):
        return LoraAddFunction.apply(y, x_lora, lora_a, lora_b, scaling)
    return _addmm_into(y, x_lora.reshape(-1, x_lora.shape[-1]) @ lora_a.t(), lora_b, scaling)


def lora_add_reference(
    y: torch.Tensor, x_lora: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Out-of-place ``y + (x_lora @ A.T @ B.T) * scaling`` in plain autograd ops (what peft computes)."""
    return y + (x_lora @ lora_a.t() @ lora_b.t()) * scaling


def lora_delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A``: (N, K) float32, the change a merge adds to the base weight (and DoRA's norm reads)."""
    with torch.autocast(lora_a.device.type, enabled=False):  # autocast would round this fp32 product to bf16
        return (lora_b.float() @ lora_a.float()) * scaling


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + scaling * B @ A||_2`` per output row: (N,) float32, detached.

    weight: (N, K) dense base weight, any float dtype (for NF4: the dequantized weight).
    """
    with torch.no_grad():
        merged = weight.float() + lora_delta_weight(lora_a.detach(), lora_b.detach(), scaling)
        return torch.linalg.vector_norm(merged, dim=1)


def dora_update(
    y: torch.Tensor,
    base_nobias: torch.Tensor,
    x_lora: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``y + (m / n - 1) * base_nobias + (m / n) * scaling * x_lora @ A.T @ B.T`` (out of place).

    y, base_nobias: (..., N); x_lora: (..., K); magnitude: (N,) trainable; weight_norm: (N,) detached.
    All operands are cast to y.dtype except the norm ratio and ``m / n - 1``, formed in the magnitude's dtype first:
    m / n is close to 1, and subtracting 1 after rounding it to bf16 would keep only its last few bits.
    """
    ratio = magnitude / weight_norm.to(magnitude.dtype)
    lora = x_lora @ lora_a.t() @ lora_b.t()
    return y + (ratio - 1).to(y.dtype) * base_nobias + ratio.to(y.dtype) * lora * scaling
