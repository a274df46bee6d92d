"""Single-launch dequantization of a 4-bit ``QuantizedTensor`` (NF4, FP4 or any 16-value codebook).

Computes ``out[i] = code[idx[i]] * absmax[i // blocksize]`` in float32 and casts once to the output
dtype (fp32, fp16 or bf16), where with double quantization
``absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset`` (float32, no fused multiply-add).
Equal bit for bit to ``nf4lora.nf4.dequantize`` (``reference.dequantize_reference``).

Layout: each program owns ``BLOCKS`` whole quantization blocks as a (BLOCKS, blocksize / 2) tile of
packed bytes, so each absmax is loaded and decoded once per block and the byte loads are contiguous
runs (16-byte vector loads). The 16-entry LUT is read from ``state.code`` (64 bytes, stays in L1).
The two values of a byte are interleaved in registers and stored contiguously. (Storing each pair
as one 32/64-bit word instead, skipping the interleave, measured 6% slower on an H200.)
Bytes moved: n/2 packed + 4 n/blocksize absmax (1 + 4/256 with double quant) + n * itemsize out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import interpreting, tuning_space
from nf4lora.nf4.tensor import QuantizedTensor

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs() -> list[triton.Config]:
    # ELEMS = elements per program. On an H200 the autotuner picked the smallest tile offered
    # (4096, 4 warps) over 8192-32768 at every benchmark shape, so smaller ones are offered too.
    return tuning_space(
        [
            triton.Config({"ELEMS": 4096}, num_warps=4),
            triton.Config({"ELEMS": 2048}, num_warps=4),
            triton.Config({"ELEMS": 2048}, num_warps=2),
            triton.Config({"ELEMS": 8192}, num_warps=8),
            triton.Config({"ELEMS": 8192}, num_warps=4),
        ]
    )


@triton.jit
def _add_rn(a, b, PTX: tl.constexpr):
    """a + b rounded on its own: an inline ``add.rn`` cannot be fused with the product feeding it."""
    if PTX:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    return a + b


@triton.jit
def decode_absmax(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, mask,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
):
    """float32 absmax of quantization blocks ``blocks`` (any shape of int indices); 0 where ``mask`` is off.

    Shared with the matmul kernel. The nested decode rounds the product before adding the offset,
    as the reference does; ``PTX`` (compiled, not interpreted) makes that hold even where the
    kernel is compiled with fp fusion on.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = _add_rn(tl.load(nested_code_ptr + q) * nested, tl.load(offset_ptr), PTX)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return scale


@triton.autotune(configs=_configs(), key=["n_elements", "BLOCKSIZE", "DOUBLE_QUANT"])
@triton.jit
def _dequantize_kernel(
    # inputs
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    # output
    out_ptr,
    # sizes
    n_elements, n_blocks,
    # format
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    # tiling
    ELEMS: tl.constexpr,
):
    BLOCKS: tl.constexpr = max(ELEMS // BLOCKSIZE, 1)
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    block_mask = blocks < n_blocks
    scale = decode_absmax(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, block_mask,
        NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
    )
    byte_offs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(packed_ptr + byte_offs, mask=byte_offs < (n_elements + 1) // 2, other=0).to(tl.int32)
    # high nibble = element 2i (format note in nf4lora/nf4/codebook.py)
    hi = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
    lo = tl.load(code_ptr + (packed & 0xF)) * scale[:, None]
    values = tl.interleave(hi, lo)
    out_offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_offs, values.to(out_ptr.dtype.element_ty), mask=out_offs < n_elements)


def format_args(q: QuantizedTensor) -> tuple:
    """(absmax, code, nested_code, nested_absmax, offset) device tensors for the kernels; unused ones alias absmax."""
    state = q.state
    if state.double_quant:
        return state.absmax, state.code, state.nested_code, state.nested_absmax, state.offset
    return state.absmax, state.code, state.absmax, state.absmax, state.absmax


def check_quantized(q: QuantizedTensor) -> None:
    """Refuse what the kernels cannot read: a codebook other than 16 entries, or state on another device."""
    state = q.state
    if state.code.numel() != 16:
        raise ValueError(f"4-bit kernels need a 16-entry codebook, got {state.code.numel()} entries")
    if state.blocksize % 2 or state.blocksize & (state.blocksize - 1):
        raise ValueError(f"blocksize {state.blocksize} is not an even power of two; valid: 32, 64, ..., 4096")
    for name, t in zip(("absmax", "code", "nested_code", "nested_absmax", "offset"), format_args(q)):
        if t.device != q.packed.device:
            raise ValueError(f"state.{name} is on {t.device} but packed is on {q.packed.device}; move with q.to()")


def dequantize_into(q: QuantizedTensor, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``q`` into ``out`` (contiguous, ``q.numel()`` elements, fp32/fp16/bf16) and return it."""
    check_quantized(q)
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"cannot dequantize to {out.dtype}; valid: float32, float16, bfloat16")
    if not out.is_contiguous() or out.numel() != q.numel():
        raise ValueError(f"out must be contiguous with {q.numel()} elements, got {out.numel()}")
    n = q.numel()
    state = q.state
    n_blocks = state.absmax.numel()
    grid = lambda meta: (triton.cdiv(n_blocks, max(meta["ELEMS"] // state.blocksize, 1)),)  # noqa: E731
    _dequantize_kernel[grid](
        q.packed, *format_args(q), out, n, n_blocks,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize or 256,
        DOUBLE_QUANT=state.double_quant, PTX=not interpreting(),
        enable_fp_fusion=False,
    )
    return out


def dequantize_triton(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``q`` to a new tensor of shape ``q.shape`` and ``dtype`` (default ``q.dtype``)."""
    dtype = q.dtype if dtype is None else dtype
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    return dequantize_into(q, out)
