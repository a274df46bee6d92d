"""Blockwise quantization (4-bit packed or 8-bit) and double quantization in two launches.

``quantize_triton(w)`` produces the same bytes as ``nf4lora.nf4.quantize`` (and so bitsandbytes):

1. one launch over ``w``: per block of ``blocksize`` elements, absmax = max|x| (float32, NaN
   propagated); full blocks scale by ``x * (1 / absmax)``, the partial last block by ``x / absmax``
   (both correctly rounded, ``div_rn``, with absmax clamped to 1e-38; only the program holding that
   block runs the slow division); the index is ``order[#bounds < x]`` (ties take the lower code; ``order``
   is looked up unless the codebook is ascending, as NF4 is). For a codebook whose midpoints each have a
   bin of their own (``midpoint_bins``: NF4 and most others) the count is the bin's count below plus one
   compare: an fma and two warp-shuffle lookups (``codes.py``). Otherwise (FP4) a branchless binary
   search over the clamped value: two scalar probes, then two shuffles. Two indices per byte, element 2i
   in the high nibble. Writes packed bytes (whole 32-bit words when n is a multiple of 8) and float32
   absmax. A program takes TILES tiles and loads the next before working on the current one.
2. with double quantization: ``offset = absmax.mean()`` (torch, so the reduction order is torch's,
   as in the reference), then the same kernel in 8-bit mode over ``absmax - offset``: blocks of 256,
   the signed dynamic map, nearest code through the reference's bin table
   (``nf4lora.nf4.blockwise._quantize_8bit`` gives the arithmetic, which the kernel repeats op for op).
   Its first program also stores the offset it read into this thread's float32 slot in host memory
   (``_offset_slot``; pinned on CUDA, so the GPU writes it directly), which the host reads after one
   stream synchronize: ``offset.item()`` would queue a device-to-host copy (into a pinned buffer it allocates)
   behind the kernels before that wait.

Non-finite input is refused with one wait for the GPU, after both launches are queued: a NaN or an
infinity makes its block's absmax, and so the offset, non-finite. A weight whose double-quantized absmax decodes
beyond its dtype (float16 near 65504) is refused as the reference refuses it; only weights whose mean absmax could
reach that (never bf16 or float32 in practice) pay for the exact check (``check_double_quant_decodes_finite``).
The state's codebooks are the cached tables' tensors, shared by every weight (copying them cost two
launches a call). Bytes moved: n * itemsize read + n/2 + 4n/blocksize written (+ the small absmax pass).
Measured on an H200 (benchmarks/results/2026-11-29_quantize-binned-ab_h200.md, bf16, blocksize 64 with double
quantization, three alternating rounds): 0.233-0.235 ms at 28672x8192 (10.1-10.3x bitsandbytes' quantize_4bit;
the binary search took 0.317 ms), 0.084-0.086 ms (6.8-7.0x) at 11008x4096, 0.058-0.059 ms (4.7-4.8x) at 4096x4096,
which is bound by host work: there the GPU is busy 0.026 ms (the search: 0.033), against 0.177 ms for bitsandbytes.
Those runs read the offset with ``.item()``. Reading it from the slot took 4096x4096 from 0.0578 to 0.0512 ms
(4.74x to 5.35x bitsandbytes, medians of 12 alternating rounds; 2026-11-29_quantize-readback-ab_h200.md); the
wall time of back-to-back calls, bound by the host work before the wait, did not move (68.6 and 69.1 us).
The 4-bit pass alone streams at 3.0-3.3 TB/s (2026-11-29_quantize-tilings_h200.md).
"""

from __future__ import annotations

import functools
import math
import threading
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from nf4lora.kernels.codes import lane_code, lookup, word_shifts
from nf4lora.kernels.dispatch import FLOAT_DTYPES, cdiv, interpreting, tuning_space
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.nf4 import blockwise, codebook
from nf4lora.nf4.double_quant import refuse_overflowing_mean
from nf4lora.nf4.tensor import (
    QuantizedTensor, QuantState, check_blocksize, check_double_quant, check_double_quant_decodes_finite,
)


def _configs() -> list[triton.Config]:
    # ELEMS = elements per tile (at least one block), TILES = tiles per program, each tile's load issued
    # before the previous tile is processed. Measured on an H200 at 4096x4096, 11008x4096 and
    # 28672x8192 (4-bit pass): two 4096-element tiles on 4 warps took 26 / 57 / 260 us against 30 / 69 /
    # 330 us for the former single 2048-element tile with byte stores.
    return tuning_space(
        [
            triton.Config({"ELEMS": 4096, "TILES": 2}, num_warps=4),
            triton.Config({"ELEMS": 2048, "TILES": 2}, num_warps=4),
            triton.Config({"ELEMS": 2048, "TILES": 4}, num_warps=4),
            triton.Config({"ELEMS": 1024, "TILES": 4}, num_warps=2),
            triton.Config({"ELEMS": 2048, "TILES": 1}, num_warps=4),
        ]
    )


# The 4-bit pass's bins: bin(s) = round(s * BIN_SCALE) + BIN_SCALE for a scaled value s in [-1, 1], 31 bins
# (0..30), the low 5 bits of fma(s, BIN_SCALE, BIN_MAGIC) read as an int32: 1.5 * 2^23 puts the float32's
# units in its low mantissa bits, and the fma rounds once, to nearest even. Constexprs: the kernel reads them.
BIN_SCALE = tl.constexpr(15)
BIN_MAGIC = tl.constexpr(1.5 * 2**23 + 15)
BINS = 32


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_tile(
    x, tile, offset_ptr, table_ptr, order_ptr, bins_ptr, out_ptr, absmax_ptr, n_elements, n_blocks,
    BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr, EIGHT_BIT: tl.constexpr, LUT_BINS: tl.constexpr,
    SORTED: tl.constexpr, BINNED: tl.constexpr, WORD_STORE: tl.constexpr, PTX: tl.constexpr,
):
    """Quantize the (BLOCKS, BLOCKSIZE) float32 tile ``x`` holding blocks ``tile * BLOCKS ...`` and store it."""
    blocks = tile * BLOCKS + tl.arange(0, BLOCKS)
    offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = offs < n_elements
    if EIGHT_BIT:
        x = tl.where(mask, x - tl.load(offset_ptr), 0.0)
        absmax = tl.max(tl.abs(x), axis=1)
        # blockwise._quantize_8bit: every block (the padded last one too) scales by 1/absmax, then the
        # nearest code comes from a table over LUT_BINS evenly spaced bins; an all-zero block takes code 0
        recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), absmax)
        scaled = tl.minimum(tl.maximum(x * recip[:, None], -1.0), 1.0)
        bins = ((scaled + 1.0) * 0.5 * (LUT_BINS - 1) + 0.5).to(tl.int32)
        bins = tl.minimum(tl.maximum(bins, 0), LUT_BINS - 1)
        idx = tl.where(absmax[:, None] == 0.0, 0, tl.load(table_ptr + bins))
        tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)
        tl.store(out_ptr + offs, idx.to(tl.uint8), mask=mask)
    else:
        # NaN/Inf: max|x| with NaN propagated (tl.max may drop it), so a block holding either stores a
        # non-finite absmax, which the host checks
        absmax = tl.reduce(tl.abs(x), 1, _max_propagating_nan)
        # 1e-38 is a float32 subnormal; a bare literal that small would be typed float64
        safe = tl.maximum(absmax, tl.full([BLOCKS], 1e-38, tl.float32))
        recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), safe)
        full = (blocks + 1) * BLOCKSIZE <= n_elements
        if (tile + 1) * (BLOCKS * BLOCKSIZE) <= n_elements:
            scaled = x * recip[:, None]
        else:  # the tile holding the partial last block: that block divides (a dozen instructions each)
            scaled = tl.where(full[:, None], x * recip[:, None], tl.math.div_rn(x, safe[:, None]))
        # pos = number of the 15 sorted midpoints strictly below the scaled value
        if BINNED:  # midpoint_bins: its bin's count below plus one compare (a warp shuffle per lookup)
            b = tl.fma(scaled, BIN_SCALE, BIN_MAGIC).to(tl.int32, bitcast=True)
            below = lookup(lane_code(bins_ptr, PTX, 32), bins_ptr, b, PTX, 32).to(tl.int32, bitcast=True)
            inside = lookup(lane_code(bins_ptr + 32, PTX, 32), bins_ptr + 32, b, PTX, 32)
            pos = below + tl.where(inside < scaled, 1, 0)
        else:  # a branchless binary search over the clamped value
            scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
            # The first two probes can only read midpoint 7, then 3 or 11: scalars and a select. The last
            # two, and the sort order of an unsorted codebook, are looked up like codes.
            pos = tl.where(tl.load(table_ptr + 7) < scaled, 8, 0)
            pos += tl.where(tl.where(pos == 8, tl.load(table_ptr + 11), tl.load(table_ptr + 3)) < scaled, 4, 0)
            lane_bounds = lane_code(table_ptr, PTX)
            pos += tl.where(lookup(lane_bounds, table_ptr, pos + 1, PTX) < scaled, 2, 0)
            pos += tl.where(lookup(lane_bounds, table_ptr, pos, PTX) < scaled, 1, 0)
        if SORTED:
            idx = pos
        else:
            idx = lookup(lane_code(order_ptr, PTX), order_ptr, pos, PTX).to(tl.int32)
        stored = tl.where(full, absmax, safe)  # the reference stores the clamped absmax of a partial block
        tl.store(absmax_ptr + blocks, stored, mask=blocks < n_blocks)
        if WORD_STORE:
            # whole 32-bit words of 8 codes (n a multiple of 8): one store where bytes took four; the
            # shifted codes' bits are disjoint, so their sum is an or
            WORDS: tl.constexpr = BLOCKSIZE // 8
            words = tl.sum(tl.reshape(idx, [BLOCKS, WORDS, 8]) << word_shifts(), axis=2)
            word_offs = blocks[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
            tl.store(out_ptr.to(tl.pointer_type(tl.int32)) + word_offs, words, mask=word_offs < n_elements // 8)
        else:
            HALF: tl.constexpr = BLOCKSIZE // 2
            hi, lo = tl.split(tl.reshape(idx, [BLOCKS, HALF, 2]))
            byte_offs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
            # an odd tail pads with the code of 0.0 (masked x = 0), as the reference does
            tl.store(out_ptr + byte_offs, ((hi << 4) | lo).to(tl.uint8), mask=byte_offs < (n_elements + 1) // 2)


@triton.autotune(configs=_configs(), key=["n_elements", "BLOCKSIZE", "EIGHT_BIT", "BINNED"], cache_results=True)
@triton.jit
def _quantize_blockwise_kernel(
    # inputs
    x_ptr, offset_ptr, table_ptr, order_ptr, bins_ptr,
    # outputs: packed bytes (stored as int32 words with WORD_STORE), or 8-bit indices; float32 absmax;
    # with EIGHT_BIT, the float32 offset copied to readback_ptr (unused otherwise)
    out_ptr, absmax_ptr, readback_ptr,
    # sizes
    n_elements, n_blocks,
    # format: EIGHT_BIT selects the 8-bit nested pass (offset subtracted, bin table, no packing);
    # SORTED says the 4-bit codebook is ascending (NF4), so the sort order is not looked up; BINNED that
    # bins_ptr holds its midpoint_bins table
    BLOCKSIZE: tl.constexpr, EIGHT_BIT: tl.constexpr, LUT_BINS: tl.constexpr, SORTED: tl.constexpr,
    BINNED: tl.constexpr, WORD_STORE: tl.constexpr, PTX: tl.constexpr,
    # tiling
    ELEMS: tl.constexpr, TILES: tl.constexpr,
):
    BLOCKS: tl.constexpr = max(ELEMS // BLOCKSIZE, 1)
    TILE: tl.constexpr = BLOCKS * BLOCKSIZE
    if EIGHT_BIT:
        if tl.program_id(0) == 0:  # for the host to read without a device-to-host copy (_offset_slot)
            tl.store(readback_ptr, tl.load(offset_ptr))
    local = tl.arange(0, BLOCKS)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    first = tl.program_id(0).to(tl.int64) * TILES
    x = tl.load(x_ptr + first * TILE + local, mask=first * TILE + local < n_elements, other=0.0)
    for t in tl.static_range(TILES):
        # the next tile's load goes out before this tile's arithmetic, so that a thread has two in flight
        if t + 1 < TILES:
            start = (first + t + 1) * TILE
            x_next = tl.load(x_ptr + start + local, mask=start + local < n_elements, other=0.0)
        _quantize_tile(
            x.to(tl.float32), first + t, offset_ptr, table_ptr, order_ptr, bins_ptr, out_ptr, absmax_ptr,
            n_elements, n_blocks, BLOCKS, BLOCKSIZE, EIGHT_BIT, LUT_BINS, SORTED, BINNED, WORD_STORE, PTX,
        )
        if t + 1 < TILES:
            x = x_next


_launch_quantize = CachedLaunch(_quantize_blockwise_kernel)


class _Tables(NamedTuple):
    code: torch.Tensor  # (C,) float32, the codebook
    code_max: float  # max |code|
    table: torch.Tensor  # 16 codes: the 15 sorted midpoints padded to 16 (float32); 256: the bin table (int32)
    order: torch.Tensor  # 16 codes: sorted position -> code index as float32; 256: unused
    ascending: bool  # the sort order is the identity (NF4), so the kernel skips its lookup
    bins: torch.Tensor | None  # 16 codes: ``midpoint_bins``' (64,) float32 table, or None (the kernel searches)


def midpoint_bins(bounds: torch.Tensor) -> torch.Tensor | None:
    """The 4-bit pass's one-step nearest-code table for sorted midpoints ``bounds`` (C-1,) float32, or None when
    two midpoints share a bin or one lies outside (-1, 1) (FP4's three midpoints near 0; then the kernel runs a
    binary search).

    Returns (64,) float32: entries 0..31 hold, as int32 bit patterns, the number of midpoints in bins below bin b;
    entries 32..63 the midpoint in bin b, or +inf. Since bin() is monotone, a midpoint in a lower bin is below s and
    one in a higher bin above it, so the number of midpoints below s (the sorted code position, ties low) is
    ``table[b] + (table[32 + b] < s)`` with b = bin(s): two lookups and a compare where the search takes four probes.
    The scaled value need not be clamped to [-1, 1] first: every midpoint lies inside, so the count is the same.
    """
    mids = bounds.tolist()
    if not all(-1 < m < 1 for m in mids):
        return None
    # the fma's exact value s * 15 + magic, rounded half to even as the GPU (and the interpreter) round it
    bins = [int(round(Fraction(m) * BIN_SCALE.value + Fraction(BIN_MAGIC.value))) % BINS for m in mids]
    if len(set(bins)) != len(bins):
        return None
    below = torch.tensor([sum(b < k for b in bins) for k in range(BINS)], dtype=torch.int32)
    inside = torch.full((BINS,), float("inf"))
    inside[bins] = bounds
    return torch.cat([below.view(torch.float32), inside])


def _code_key(code: torch.Tensor) -> tuple[int, ...]:
    """``code`` (C,) float32 as its bit patterns: the tables' cache key. As Python floats -0.0 == 0.0, so a
    codebook and its copy with a zero's sign flipped would share one entry and the second record the first's code."""
    return tuple(code.view(torch.int32).tolist())


@functools.lru_cache(maxsize=64)
def _lookup_tables(code_bits: tuple[int, ...], device: torch.device) -> _Tables:
    """The codebook whose float32 bit patterns are ``code_bits`` (``_code_key``) and its search tables on
    ``device``. The 16-code tables are read like a codebook, one entry per lane. Cached so that quantizing a
    model's layers does not rebuild them (a 65536-entry search for 256 codes) and copy them to the device for
    every weight."""
    code = torch.tensor(code_bits, dtype=torch.int32).view(torch.float32)
    if code.numel() == 256:
        table = blockwise.bin_table(code).to(device=device, dtype=torch.int32)
        return _Tables(code.to(device), float(code.abs().max()), table, code.to(device), ascending=False, bins=None)
    bounds, order = blockwise.code_lookup(code)  # order None: ascending, so the kernel skips the lookup
    table = torch.cat([bounds, bounds.new_tensor([float("inf")])])  # the pad is never looked up
    order_codes = torch.arange(code.numel()) if order is None else order
    bins = midpoint_bins(bounds)
    return _Tables(
        code.to(device), float(code.abs().max()), table.to(device), order_codes.to(device=device, dtype=torch.float32),
        order is None, None if bins is None else bins.to(device),
    )


@functools.lru_cache(maxsize=8)
def _nested_tables(device: torch.device) -> _Tables:
    """The double quantization's 256-code tables (hashing their 256 values once per device, not per call)."""
    return _lookup_tables(_code_key(codebook.dynamic_map(signed=True)), device)


@functools.lru_cache(maxsize=16)
def _named_tables(quant_type: str, device: torch.device) -> _Tables:
    """The tables of a named codebook ("nf4", "fp4"), without building and hashing its values on every call."""
    return _lookup_tables(_code_key(codebook.get_code(quant_type)), device)


class _OffsetSlot(NamedTuple):
    """Where the nested pass copies the offset for the host to read."""

    host: torch.Tensor  # (1,) float32 in host memory, pinned for a CUDA device: the kernel's store target
    view: np.ndarray  # (1,) float32, numpy's view of it: reading through it costs a third of ``host.item()``


_slots = threading.local()  # per thread: {device: _OffsetSlot}


def _offset_slot(device: torch.device) -> _OffsetSlot:
    """This thread's offset slot for quantizing on ``device``, allocated on first use. Under unified addressing
    torch's pinned memory (cudaHostAlloc, or cudaHostRegister) is mapped for every GPU, and Triton's launcher
    passes the device pointer the driver gives for each tensor argument, so the kernel stores into it. One per
    thread and device: a call reads its slot before the thread's next call writes it, and no other thread's
    call writes it at all."""
    slots = getattr(_slots, "by_device", None)
    if slots is None:
        slots = _slots.by_device = {}
    slot = slots.get(device)
    if slot is None:
        host = torch.empty(1, dtype=torch.float32, pin_memory=device.type == "cuda")
        slot = slots[device] = _OffsetSlot(host, host.numpy())
    return slot


def _read_offset(slot: _OffsetSlot, device: torch.device) -> float:
    """The offset the nested pass on ``device`` stored in ``slot``, once the current stream has run it (the
    one wait; the interpreter runs kernels before the launch returns)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return slot.view.item(0)


def _launch(
    x: torch.Tensor, tables: _Tables, blocksize: int, nested: tuple[torch.Tensor, torch.Tensor] | None = None
):
    """One blockwise pass over contiguous ``x`` (any shape, read flat) with the codebook of ``tables``.
    4-bit (nested None): packed (ceil(n/2),) uint8 and absmax (nblocks,) float32. 8-bit, with ``nested`` =
    (offset, readback): over ``x - offset`` (offset a 0-d float32), indices (n,) uint8 and absmax (nblocks,)
    float32, and the offset copied into the first element of ``readback`` (float32, memory the GPU can write)."""
    n = x.numel()
    n_blocks = blockwise.num_blocks(n, blocksize)
    eight_bit = nested is not None
    out = torch.empty(n if eight_bit else (n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    offset, readback = nested if eight_bit else (absmax, absmax)  # the 4-bit pass reads neither
    word_store = not eight_bit and n % 8 == 0
    grid = lambda meta: (cdiv(n_blocks, max(meta["ELEMS"] // blocksize, 1) * meta["TILES"]),)  # noqa: E731
    binned = tables.bins is not None
    _launch_quantize(
        grid, (n, blocksize, eight_bit, tables.ascending, binned, x.dtype),
        x, offset, tables.table, tables.order, tables.bins if binned else tables.table, out, absmax, readback,
        n, n_blocks,
        BLOCKSIZE=blocksize, EIGHT_BIT=eight_bit, LUT_BINS=blockwise.LUT_BINS, SORTED=tables.ascending,
        BINNED=binned, WORD_STORE=word_store, PTX=not interpreting(), enable_fp_fusion=False,
    )
    return out, absmax


def quantize_triton(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    code: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` (any shape, fp32/fp16/bf16, finite) to a ``QuantizedTensor``; bytes equal the reference.

    Arguments as ``nf4lora.nf4.quantize``; a custom (16,) float32 ``code`` records quant_type "custom".
    """
    if w.dtype not in FLOAT_DTYPES or w.numel() == 0:
        blockwise.check_float_input(w, "weight")
    blocksize = check_blocksize(blocksize)
    double_quant = check_double_quant(double_quant)
    if code is None:
        tables = _named_tables(quant_type, w.device)
    else:
        code, quant_type = codebook.resolve_code(quant_type, code)
        tables = _lookup_tables(_code_key(code), w.device)
    # the kernel reads w flat through its data pointer, so a contiguous w needs no reshaped view
    packed, absmax = _launch(w if w.is_contiguous() else w.contiguous(), tables, blocksize)
    # The state's codebooks are the cached device tensors, shared by every weight quantized with them:
    # a copy per weight cost two launches, about a third of the host time of a 4096x4096 call.
    state = dict(
        absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type, code=tables.code,
    )
    if double_quant:
        offset = absmax.mean()
        nested = _nested_tables(w.device)
        slot = _offset_slot(w.device)
        quantized, nested_absmax = _launch(absmax, nested, codebook.NESTED_BLOCKSIZE, (offset, slot.host))
        # Read at once, so that the slot is never left to a kernel still in flight. Everything is queued by now,
        # so the host waits for the GPU once; a NaN or an infinity in absmax makes the mean non-finite, so the
        # offset is the one scalar to read.
        mean = _read_offset(slot, w.device)
        state.update(
            absmax=quantized, offset=offset, nested_absmax=nested_absmax, nested_code=nested.code,
            nested_blocksize=codebook.NESTED_BLOCKSIZE,
        )
    quant_state = QuantState(**state)
    if not double_quant:
        if not bool(torch.isfinite(absmax).all()):
            blockwise.check_float_input(w, "weight")  # raises with the reference's message
        return QuantizedTensor(packed, quant_state)
    # Finite weights can still overflow the mean of their absmax: refused as the reference does.
    if not math.isfinite(mean):
        blockwise.check_float_input(w, "weight")
        refuse_overflowing_mean(absmax)
    check_double_quant_decodes_finite(quant_state, mean, tables.code_max)
    return QuantizedTensor(packed, quant_state)
