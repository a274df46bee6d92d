"""Single-launch dequantization of a 4-bit ``QuantizedTensor`` (NF4, FP4 or any 16-value codebook).

Computes ``out[i] = code[idx[i]] * absmax[i // blocksize]`` in float32 and casts once to the output
dtype (fp32, fp16 or bf16), where with double quantization
``absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset`` (float32, no fused multiply-add).
Equal bit for bit to ``nf4lora.nf4.dequantize`` (``reference.dequantize_reference``).

Layout: each program owns ``BLOCKS`` whole quantization blocks as a (BLOCKS, blocksize / 8) tile of
32-bit words, so each absmax is loaded and decoded once per block, and a thread's words arrive as one 8- or
16-byte vector (4 words with 4096 elements a program). Codes are looked up with a warp
shuffle (``codes.py``). Two kernels share that body and differ in how the values leave:

- ``_dequantize_tma_kernel`` (default where ``tma_store_fits``: Hopper or later, whole blocks of at most 256
  elements, 16-byte aligned out): the (BLOCKS, blocksize) tile goes to shared memory and the tensor memory
  accelerator writes it out, one fixed tiling of 4096 elements.
- ``_dequantize_kernel`` (everything else, and ``bulk_store=False``): plain 16-byte stores, autotuned tiling.

On an H200 the TMA stores lifted bf16 dequantization from 81.9-82.3% to 85.0-85.5% of the copy bandwidth at the
7B MLP shapes and from 70% to 77-78% at 4096x4096, and tied at 28672x8192 (92.4-92.7%), in one sweep
(benchmarks/results/2026-11-28_dequantize-tma-sweep_h200.md); in the full kernels run 87.6-88.1% at the 7B shapes
and 92.9% at 70B, 1.78-2.19x bitsandbytes (..._kernels-calling-thread_h200.md). They cost host time, though:
Triton encodes the descriptor at every launch, 30-34 us a call against 19-25 us with plain stores on that
machine's host (..._dequantize-tma_h200.md). So callers that a host-bound training step makes hundreds of times
(``matmul_nf4``, the LoRA Function) pass ``bulk_store=False``. Loading the words as vectors (``n_words``, below)
then gave 88.8% at the 7B MLP shapes, 93.1-93.2% at 70B and 89.7% at 4096x4096
(..._dequantize-wide-loads_h200.md). Those replays let every call write one output buffer, which at 4096x4096
(34 MB) fits in L2; with each call writing its own, 4096x4096 runs at 81.2% and the larger shapes at 88.0% and
92.4% (2026-11-29_kernels_h200.md).

A tensor whose element count is not a multiple of 8 has its packed bytes copied to a word-aligned buffer
first (small odd shapes only; weight matrices never need it).
Bytes moved: n/2 packed + 4 n/blocksize absmax (1 + 4/256 with double quant) + n * itemsize out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nf4lora.kernels.codes import decode_absmax, dequantize_words, lane_code
from nf4lora.kernels.dispatch import FLOAT_DTYPES, cdiv, has_tma, interpreting, tuning_space
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.nf4.codebook import BLOCKSIZES
from nf4lora.nf4.tensor import QuantizedTensor


# The TMA-store kernel's one tiling: elements per program and warps. In a sweep on an H200 (bf16 out, blocksize 64)
# 4096 elements with 4 warps led the TMA variants at every shape; 8 warps, or two tiles per program, ran 1-9% slower.
TMA_STORE_ELEMS = 4096
TMA_STORE_WARPS = 4


def _configs() -> list[triton.Config]:
    # ELEMS = elements per program (at least one block)
    return tuning_space(
        [
            triton.Config({"ELEMS": 4096}, num_warps=4),
            triton.Config({"ELEMS": 2048}, num_warps=4),
            triton.Config({"ELEMS": 8192}, num_warps=8),
            triton.Config({"ELEMS": 8192}, num_warps=4),
            triton.Config({"ELEMS": 16384}, num_warps=8),
        ]
    )


@triton.jit
def _dequantize_blocks(
    words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, n_words, n_blocks,
    dtype: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    PTX: tl.constexpr,
):
    """The (BLOCKS, BLOCKSIZE) dequantized values of quantization blocks ``blocks`` (BLOCKS,), in ``dtype``.

    ``n_words`` = ceil(n / 8) is an argument, not computed here: Triton then knows when it is a multiple of 16 (every
    weight matrix) and loads each thread's words as 16-byte vectors under one predicate, not one 4-byte load each.
    """
    WORDS: tl.constexpr = BLOCKSIZE // 8
    scale = decode_absmax(
        absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, blocks < n_blocks,
        NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
    )
    word_offs = blocks[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
    words = tl.load(words_ptr + word_offs, mask=word_offs < n_words, other=0)
    lane_codes = lane_code(code_ptr, PTX)
    return dequantize_words(words, scale[:, None], lane_codes, code_ptr, dtype, PTX)


@triton.autotune(configs=_configs(), key=["n_elements", "BLOCKSIZE", "DOUBLE_QUANT"], cache_results=True)
@triton.jit
def _dequantize_kernel(
    # inputs
    words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
    # output
    out_ptr,
    # sizes
    n_elements, n_words, n_blocks,
    # format
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    # tiling
    ELEMS: tl.constexpr,
):
    BLOCKS: tl.constexpr = max(ELEMS // BLOCKSIZE, 1)
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    values = _dequantize_blocks(
        words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, n_words,
        n_blocks, out_ptr.dtype.element_ty, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
    )
    out_offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_offs, values, mask=out_offs < n_elements)


@triton.jit
def _dequantize_tma_kernel(
    words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_desc, n_words, n_blocks,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """``_dequantize_kernel`` with one fixed tiling whose values leave through the tensor memory accelerator:
    ``out_desc`` describes out as (n_blocks, BLOCKSIZE) in (BLOCKS, BLOCKSIZE) boxes; rows past the end are clipped."""
    first = tl.program_id(0) * BLOCKS
    blocks = first.to(tl.int64) + tl.arange(0, BLOCKS)
    values = _dequantize_blocks(
        words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, n_words,
        n_blocks, out_desc.dtype, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
    )
    out_desc.store([first, 0], values)


_launch_dequantize = CachedLaunch(_dequantize_kernel)
_launch_dequantize_tma = CachedLaunch(_dequantize_tma_kernel)


def packed_words(q: QuantizedTensor) -> torch.Tensor:
    """``q.packed`` as int32 words of 8 codes, copied into a zero-padded buffer when not whole, aligned words in place."""
    packed = q.packed
    if packed.numel() % 4 or packed.storage_offset() % 4 or not packed.is_contiguous():
        padded = torch.zeros(cdiv(packed.numel(), 4) * 4, dtype=torch.uint8, device=packed.device)
        padded[: packed.numel()] = packed
        packed = padded
    return packed.view(torch.int32)


def format_args(q: QuantizedTensor) -> tuple:
    """(absmax, code, nested_code, nested_absmax, offset) device tensors for the kernels; unused ones alias absmax."""
    state = q.state
    if state.double_quant:
        return state.absmax, state.code, state.nested_code, state.nested_absmax, state.offset
    return state.absmax, state.code, state.absmax, state.absmax, state.absmax


def check_quantized(q: QuantizedTensor) -> None:
    """Refuse what the kernels cannot read: a codebook other than 16 entries, a blocksize bitsandbytes does not
    write, or state on another device or strided (the kernels index it as a dense array)."""
    state = q.state
    if state.code.numel() != 16:
        raise ValueError(f"4-bit kernels need a 16-entry codebook, got {state.code.numel()} entries")
    if state.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {state.blocksize} is not supported; valid: {', '.join(map(str, BLOCKSIZES))}")
    for name, t in zip(("absmax", "code", "nested_code", "nested_absmax", "offset"), format_args(q)):
        if t.device != q.packed.device:
            raise ValueError(f"state.{name} is on {t.device} but packed is on {q.packed.device}; move with q.to()")
        if not t.is_contiguous():
            raise ValueError(f"state.{name} has strides {t.stride()}; the kernels need it contiguous (.contiguous())")


def check_output_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot dequantize to {dtype}; valid: float32, float16, bfloat16")


def tma_store_fits(blocksize: int, n_elements: int, out: torch.Tensor) -> bool:
    """Whether ``_dequantize_tma_kernel`` can write ``out``: a GPU with TMA, whole blocks, boxes within TMA's 256
    elements a side (BLOCKS = TMA_STORE_ELEMS / blocksize rows of blocksize), and out's base and block rows on
    16-byte boundaries."""
    return (
        n_elements % blocksize == 0
        and blocksize <= 256
        and blocksize * out.element_size() % 16 == 0
        and out.data_ptr() % 16 == 0
        and has_tma(out.device)
    )


def dequantize_into(q: QuantizedTensor, out: torch.Tensor, bulk_store: bool = True) -> torch.Tensor:
    """Dequantize ``q`` into ``out`` (contiguous, ``q.numel()`` elements, fp32/fp16/bf16) and return it.

    ``bulk_store``: write through TMA where ``tma_store_fits`` (less GPU time, about 10 us more host time per call
    on the H200 host here: Triton builds the descriptor at every launch); False always takes plain stores.
    """
    check_quantized(q)
    check_output_dtype(out.dtype)
    if not out.is_contiguous() or out.numel() != q.numel():
        layout = "contiguous" if out.is_contiguous() else f"strides {out.stride()}"
        raise ValueError(f"out must be contiguous with {q.numel()} elements, got {out.numel()} ({layout})")
    if out.device != q.packed.device:
        raise ValueError(f"out is on {out.device} but q is on {q.packed.device}; valid: out on q's device")
    n = q.numel()
    state = q.state
    n_blocks = state.absmax.numel()
    n_words = cdiv(n, 8)
    key = (n, state.blocksize, state.nested_blocksize, state.double_quant, out.dtype)
    args = (packed_words(q), *format_args(q))
    fmt = dict(
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize or 256,
        DOUBLE_QUANT=state.double_quant, PTX=not interpreting(), enable_fp_fusion=False,
    )
    if bulk_store and tma_store_fits(state.blocksize, n, out):
        blocks = TMA_STORE_ELEMS // state.blocksize
        # the descriptor reads only out's address and dtype, so out needs no (n_blocks, blocksize) view
        out_desc = TensorDescriptor(out, [n_blocks, state.blocksize], [state.blocksize, 1], [blocks, state.blocksize])
        _launch_dequantize_tma(
            lambda meta: (cdiv(n_blocks, blocks),), key, *args, out_desc, n_words, n_blocks, BLOCKS=blocks,
            num_warps=TMA_STORE_WARPS, **fmt,
        )
    else:
        grid = lambda meta: (cdiv(n_blocks, max(meta["ELEMS"] // state.blocksize, 1)),)  # noqa: E731
        _launch_dequantize(grid, key, *args, out, n, n_words, n_blocks, **fmt)
    return out


def dequantize_triton(
    q: QuantizedTensor, dtype: torch.dtype | None = None, bulk_store: bool = True
) -> torch.Tensor:
    """Dequantize ``q`` to a new tensor of shape ``q.shape`` and ``dtype`` (default ``q.dtype``); ``bulk_store`` as
    in ``dequantize_into``."""
    dtype = q.dtype if dtype is None else dtype
    check_output_dtype(dtype)  # before torch.empty, which refuses a non-dtype in its own words
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    return dequantize_into(q, out, bulk_store)
