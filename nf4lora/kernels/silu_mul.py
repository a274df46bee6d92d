"""SwiGLU's gate in one launch for inference: ``silu(gate) * up``.

Rounds as the eager ``F.silu(gate) * up`` does: silu computed in float32 (``g / (1 + exp(-g))``) and rounded to
the inputs' dtype, then the product computed in float32 and rounded. ``exp`` is Triton's, so an output may
differ from torch's in the last bit. gate and up (..., I) may be views with strided rows (the two halves of one
grouped projection output); the result is contiguous. Eagerly that is two kernels and an (..., I) round trip
through memory in between; no autograd (the model calls it only when nothing needs a gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import FLOAT_DTYPES, cdiv
from nf4lora.kernels import pdl
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.kernels.pdl import release_dependents, wait_for_producer
from nf4lora.kernels.rms_norm import rows_2d

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, I, stride_gate, stride_up, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, column block): out[row, cols] = silu(gate[row, cols]) * up[row, cols]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < I
    wait_for_producer(PDL)
    release_dependents(PDL)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=live, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=live, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * I + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=live)


_launch = CachedLaunch(_silu_mul_kernel)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the kernel takes these: gate and up of one shape (..., I), one fp32/fp16/bf16 dtype and device."""
    return (
        gate.shape == up.shape and gate.dim() > 0 and gate.numel() > 0 and gate.dtype == up.dtype
        and gate.dtype in FLOAT_DTYPES and gate.device == up.device
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate, up (..., I) of one dtype; returns a contiguous (..., I) tensor."""
    if not supports(gate, up):
        raise ValueError(
            f"silu_mul takes gate and up of one non-empty shape, one fp32/fp16/bf16 dtype and one device; got gate "
            f"{tuple(gate.shape)} {gate.dtype} {gate.device}, up {tuple(up.shape)} {up.dtype} {up.device}"
        )
    (gate_rows, gate_stride), (up_rows, up_stride) = rows_2d(gate), rows_2d(up)
    width = gate.shape[-1]
    rows = gate.numel() // width
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    launch = pdl.launch_meta(gate.device)
    key = (rows, width, gate_stride, up_stride, gate.dtype)
    _launch(
        lambda meta: (rows, cdiv(width, BLOCK)), key, gate_rows, up_rows, out, width, gate_stride, up_stride,
        BLOCK=BLOCK, num_warps=4, **launch,
    )
    return out
