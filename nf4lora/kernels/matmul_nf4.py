"""Large-M path of ``nf4_linear``: dequantize into a reused buffer, then cuBLAS.

For M in the thousands the matmul is compute-bound (2*M*N*K flops against N*K/2 weight bytes), so
the fastest path is the vendor GEMM on a dequantized weight; the dequantize launch
(``dequantize_nf4``, near copy bandwidth) adds N*K*(0.5 + itemsize) bytes of traffic. The
alternative, a fused dequant-matmul (``gemv_nf4.fused_matmul`` with ``block_m=128``), is timed
side by side in ``benchmarks/kernels.py``: at M = 4096 it ran 2.3-3.0x slower than dequantize +
cuBLAS on an H200 (0.62 ms vs 0.21 ms at 4096x4096; benchmarks/results/2026-11-28_kernels-calling-thread_h200.md),
so ``nf4_linear`` uses dequantize + cuBLAS. In that run the forward ran at 0.93-1.00x of bf16 F.linear and
forward + backward at 0.93-1.05x on the five 7B/70B projections, backward on the calling thread (0.905-1.00x
at the 70B shapes over ten runs). With backward on autograd's worker thread, 4096x4096 is bound by host time
(0.58-0.83x). Timed in alternating rounds (benchmarks/results/2026-11-30_kernels-calling-thread_h200.md and
its -subset run), forward + backward ran at 0.936-0.979x bf16 at the 70B shapes: the GEMMs match bf16's, and the
two dequantizes cost 5.3% of its time (5.0% even at copy bandwidth), so this path cannot get inside 5% there.
Running the dequantize beside the GEMM does not hide it, even through cuBLASLt with multiprocessors left free for
it: the GEMM loses what the overlap saves (benchmarks/results/2026-11-30_gemm-carveout-probe_h200.md).

Note: the buffer is one per (device, dtype), grown to the largest weight seen and reused by every
layer, so a model's forward holds one dense weight at a time, never one per layer. Reuse is safe
because all kernels and the GEMM are issued on the current stream in order; a caller that runs
``nf4_linear`` on several streams at once must not share a device between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nf4lora.kernels.dequantize_nf4 import dequantize_into
from nf4lora.nf4.tensor import QuantizedTensor

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_views: dict[tuple[torch.device, torch.dtype, torch.Size], torch.Tensor] = {}


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous ``shape`` view of the shared buffer for (device, dtype), grown when too small.

    Views are cached per shape: a model has a handful of weight shapes, and slicing a view out of
    the buffer costs two ops of host time per call.
    """
    device = torch.device(device)
    view = _views.get((device, dtype, shape))
    if view is not None:
        return view
    numel = shape.numel()
    buffer = _workspaces.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        for stale in [k for k in _views if k[:2] == (device, dtype)]:
            del _views[stale]  # views of the old buffer would keep it alive
        _workspaces.pop((device, dtype), None)  # free the old buffer before allocating the larger one
        buffer = _workspaces[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    view = _views[(device, dtype, shape)] = buffer[:numel].view(shape)
    return view


def release_workspaces() -> None:
    """Drop the shared dequantization buffers (e.g. before a memory-hungry phase)."""
    _views.clear()
    _workspaces.clear()


def dequant_matmul(
    x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None, transpose: bool = True
) -> torch.Tensor:
    """``x2d @ W.T + bias`` (transpose=True, forward) or ``x2d @ W`` (transpose=False, grad_input).

    x2d: (M, K) for the forward or (M, N) for grad_input, fp32/fp16/bf16; W = dequant(qweight) (N, K)
    in x2d.dtype. Returns (M, N) or (M, K) in x2d.dtype.
    """
    # plain stores: a training step makes a few hundred of these calls and is bound by host time, where TMA's
    # per-launch descriptor (about 10 us) costs more than its 1-2 us of GPU time saves
    weight = dequantize_into(qweight, workspace(qweight.shape, x2d.dtype, qweight.device), bulk_store=False)
    if transpose:
        return F.linear(x2d, weight, None if bias is None else bias.to(x2d.dtype))
    return x2d @ weight
