"""Fused dequantize-matmul ``y = x @ dequant(W).T + bias`` for a 4-bit ``QuantizedTensor`` W (N, K).

Two kernels stream the packed weight once, as 32-bit words of 8 codes:

- ``_gemv_kernel`` (M = 1 and 2, decode): CUDA cores. A program owns BLOCK_N rows; each step reads a
  (BLOCK_N, 32) tile of words, 256 columns: every row's slice is a whole 128-byte line, which a
  warp reads with 8 threads (16 bytes each), so a load instruction touches 4 lines instead of 16
  partly used ones. Each thread looks up the 8 codes of its words, multiplies them by the matching
  entries of x in fp32, and scales each word's partial sum by its block's absmax (the step spans
  one or more quantization blocks per row). x is read one step ahead, 16 bytes per word, and
  reused by the rows a thread owns, so the weight dominates the traffic. With ``ROWS = 2`` each
  looked-up code is multiplied into two rows of x (a second set of accumulators, same lookups).
- ``_gemv_parts_kernel``: the same GEMV program over two or three weights that read one x (a decode
  step's q/k/v or gate/up), each weight owning a run of the grid's programs and its own pointers, so one
  launch streams them all (``fused_matmul_parts``).
- ``_tile_kernel`` (M = 3..16 with ``BLOCK_M = 16``; 64/128 for the large-M variant timed in
  ``benchmarks/kernels.py``): tensor cores. A step's (BLOCK_N, 8)-word tile of codes is fed to
  ``tl.dot`` as the A operand of ``W_tile @ x_tile.T``, so the MMA's M dimension is BLOCK_N rows of W,
  not the few rows of x. A step spans one quantization block (or part of one) of every row. For
  16-bit x the codes are looked up by byte permutes (``codes.word_codes``), rounded to x.dtype and
  left unscaled, and each row's absmax scales the step's fp32 product: one multiply per output
  instead of one per weight. For fp32 x each code is multiplied by its absmax in fp32 first, so the
  dot sees exactly the reference's dequantized weight.

The GEMV looks codes up with a warp shuffle (``codes.py``): a weight's lookup and product take 3
instructions (shift, shuffle, fma). The tile kernel used to as well, and there the shuffles, which
share the load/store pipe with the dot's shared-memory staging, held it to 0.89-1.05x bf16 at
M = 3..16; byte permutes run on the integer units and made it 1.2x faster
(benchmarks/results/2026-11-28_tile-prmt-variant_h200.md). The same permutes in the GEMV were 12-24%
slower than its shuffles (..._gemv-lut-variants_h200.md): there every code must also become fp32.

Why the GEMV is shaped this way (Nsight Compute on an H200, 28672x8192, before the 32-word steps):
the L1 data pipe was 87% busy while DRAM ran at 25%. Every shuffle is one L1 wavefront, and so was
every 32-byte sector of the 8-word steps' weight loads; the warps mostly stalled on shuffle
results. Whole-line loads cut the weight's share of that pipe by 4x. What caps the GEMV now is the
per-word arithmetic rather than the lookups or the loads (2026-11-29_gemv-structure-probes_h200.md):
without any lookups it reaches 1.84 TB/s at 28672x8192 against 1.67, while the same reads with two
products per word instead of eight stream at 2.8-3.0 TB/s, and a plain read at 3.5-3.6 TB/s. The loop's other
instructions are not: without its register moves (8.7% fewer instructions), or with 128 registers for 16 warps a
multiprocessor instead of 12, it ran 0.97-1.01x as fast (2026-11-30_gemv-loop-overhead-variants_h200.md).

Split-K: when N / BLOCK_N tiles cannot fill the GPU, K is cut into ``n_splits`` chunks whose fp32
partial sums go to a (n_splits, M, N) buffer. Each program then counts its arrival on its output
tile with one atomic; the last of a tile's splits to arrive reads all of the tile's partials back,
adds them in split order with the bias, writes the output and resets the counter. So the sum is
deterministic (the order never depends on which split finished last) and there is no second
launch, which in a CUDA-graphed decode step cost about 1.7 us per projection on an H200.

Needs K % 8 == 0 and K % blocksize == 0 (``supports``), true of every Llama projection;
``nf4_linear`` sends other shapes to ``matmul_nf4.dequant_matmul``.
Bytes moved: N*K/2 packed + absmax + M*K*itemsize x + M*N*itemsize out. Compiled for sm_90 the
GEMV's loop is 4.5-5.2 instructions per weight (6.1-7.4 with two rows) and the bf16 tile kernel's
5.3 with (128, 4), 2.2 of them byte permutes and none on the load/store pipe (the shuffle version's was
5.7-6.1, one of them a shuffle). Measured on an H200 in bf16
(benchmarks/results/2026-11-28_kernels-calling-thread_h200.md): M = 1 streams the 70B projections at
1.72-1.76 TB/s (1.82-1.83x bf16 F.linear) and 4096x4096 at 1.70x bf16; M = 2 runs at 1.28-1.59x bf16; M = 3..16
at 1.07-1.27x bf16 and 1.6-3.6x bitsandbytes. One launch for
3 x 4096x4096 (q/k/v) took 0.020 against 0.028 ms for three (2026-11-29_grouped_h200.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nf4lora.kernels.codes import (
    code_tables, decode_loaded_absmax, dequantize_words, lane_code, load_absmax, lookup, word_codes,
)
from nf4lora.kernels.dequantize_nf4 import check_quantized, format_args, packed_words
from nf4lora.kernels.dispatch import cdiv, dot_precision, interpreting, is_hopper, multiprocessors, tuning_space
from nf4lora.kernels import pdl
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.kernels.linear import check_linear_args
from nf4lora.kernels.pdl import release_dependents, wait_for_producer
from nf4lora.nf4.tensor import QuantizedTensor

# Split-K cuts K into chunks of a multiple of these many columns (whole steps), by kernel and weight:
# (smallest weight in elements, smallest K, chunk multiple), first match. Swept on an H200 in bf16 with
# benchmarks/split_k.py (2026-11-28_split-k*_h200.md): the GEMV (M = 1, 2) ran 8-18% faster with 2048 from
# 11008x4096 up, and 11-27% slower at 4096x4096 (too few programs). The tile kernel with byte-permute
# lookups, M = 3, 8, 16, three interleaved repeats (2026-11-28_tile-split-k_h200.md): 256 at 4096x4096
# (1.05-1.10x bf16; 512 gave 1.00-1.05x), 512 at 11008x4096 (1.08-1.12x; 1024 gave 1.03x at M = 16), 1024 at
# 4096x11008 (1.14-1.16x; 512 gave 1.07-1.11x), and 2048 at the 70B shapes (1-2% ahead of 1024).
GEMV_CHUNK_ALIGNS = ((1 << 25, 0, 2048), (0, 0, 1024))
TILE_CHUNK_ALIGNS = ((1 << 27, 0, 2048), (1 << 25, 4097, 1024), (1 << 25, 0, 512), (0, 0, 256))
# aim for this many programs per multiprocessor before splitting K further
PROGRAMS_PER_SM = 16
# Words per row in one step. The GEMV reads 32 (a whole 128-byte line per row, so a warp's load
# touches 4 lines rather than 16 partly used ones: the loads, not the arithmetic, filled the L1
# pipe); the tile kernel reads 8 (64 columns, the k of one tl.dot).
GEMV_WORDS_PER_STEP = 32
TILE_WORDS_PER_STEP = 8

# (BLOCK_N, num_warps) per kernel; the first entry is the interpreter's. num_stages stays 1: the
# pipeliner would stage the tiles through shared memory, while the kernels keep two steps of loads
# in flight in registers themselves. The GEMV favours small tiles (many programs, 16 words per
# thread); with two rows of x it keeps the configs whose accumulators fit GEMV_MAX_ACC per thread.
# Tile kernel register counts with byte-permute lookups (triton 3.9, sm_90): (64, 4) 96, (128, 4) 127.
GEMV_CONFIGS = [(32, 2), (16, 1), (32, 1), (32, 4), (64, 2), (64, 4)]
GEMV_MAX_ACC = 32
# On Hopper the GEMV is not autotuned: timing one weight at a time, the autotuner picked a config over 5% slower (up
# to 1.71x) than the best in CUDA-graph replays over rotating weight copies (as a decode step runs) in 26 of 116
# tunings on an H200, most often at small weights, and Triton keeps a pick on disk. ``hopper_gemv_config`` picks
# from the grid each config would launch instead. A wave is the programs the multiprocessors hold at once, which
# their registers per thread decide (triton 3.6, sm_90; HOPPER_RESIDENT). (32, 2) for one row and (64, 4) for two
# ran fastest wherever their grid fills its last wave well; within two waves, the other of the pair replaces them
# when it fills its own last wave better; and a grid of under two (32, 2) programs per multiprocessor runs faster as
# more, smaller (16, 1) programs (benchmarks/results/2026-11-29_gemv-tuning_h200.md,
# benchmarks/results/2026-11-30_gemv-hopper-rule_h200.md).
HOPPER_RESIDENT = {(1, 32, 2): 6, (1, 64, 4): 4, (2, 32, 2): 4, (2, 64, 4): 3}
HOPPER_PREFERRED = {1: ((32, 2), (64, 4)), 2: ((64, 4), (32, 2))}
TILE_CONFIGS = {
    # (128, 8) and (256, 8) ran 15-50% slower with byte-permute lookups and the autotuner, timing one weight
    # that sits in L2, sometimes picked them (benchmarks/results/2026-11-28_tile-configs_h200.md)
    16: [(64, 4), (128, 4)],
    64: [(64, 4), (128, 8)],
    128: [(64, 4), (128, 8)],
}
# Rows of x per GEMV program: M = 1 and M = 2 run the GEMV (each looked-up code multiplied into both
# rows), larger M the tile kernel. On an H200 two rows per GEMV beat the tile kernel at M = 2 (1.01-1.16x
# bf16 against 0.85-0.99x, ..._kernels-small-m_h200.md), while four or eight rows lost to it
# (benchmarks/results/2026-11-28_small-m-variants_h200.md).
GEMV_ROWS = (1, 2)
# Reads of a tile's split-K partials in flight in its last program. The tile kernel keeps 2: 8 would raise its
# registers from 72 to 123 ((64, 4), sm_90, triton 3.6, shuffle lookups) and cut it from 7 to 4 programs per multiprocessor.
# The GEMV's 168 registers do not change with 8.
GEMV_SPLIT_READS = 8
TILE_SPLIT_READS = 2
BLOCK_MS = (*GEMV_ROWS, *TILE_CONFIGS)
MIN_BLOCK_N = min(n for table in (GEMV_CONFIGS, *TILE_CONFIGS.values()) for n, _ in table)
_X_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _configs(table: list[tuple[int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=1) for n, w in table]


def hopper_gemv_config(rows: int, part_rows: list[int], n_splits: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the GEMV on Hopper for ``rows`` (1 or 2) rows of x, weights of ``part_rows`` rows
    each, K cut into ``n_splits`` and ``sms`` multiprocessors (the rule above HOPPER_RESIDENT)."""
    def programs(block_n: int) -> int:
        return sum(cdiv(n, block_n) for n in part_rows) * n_splits

    def waves(config: tuple[int, int]) -> float:
        return programs(config[0]) / (HOPPER_RESIDENT[(rows, *config)] * sms)

    def last_wave_filled(config: tuple[int, int]) -> float:
        return waves(config) / math.ceil(waves(config))

    if programs(32) < 2 * sms:
        return (16, 1)
    preferred, other = HOPPER_PREFERRED[rows]
    if waves(preferred) <= 2 and last_wave_filled(other) > last_wave_filled(preferred):
        return other
    return preferred


def _prune_gemv(configs, named_args, **kwargs):
    """Keep the configs whose ROWS x (words per thread) fp32 accumulators fit GEMV_MAX_ACC (the first
    such under the interpreter); on Hopper, ``hopper_gemv_config``'s alone."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    rows, sub_w = arg("ROWS"), arg("SUB_W")
    device = named_args["x_ptr"].device
    if is_hopper(device):
        part_rows = [arg("N")] if "N" in named_args else [arg(f"N_{p}") for p in range(3)]
        chosen = hopper_gemv_config(rows, part_rows, cdiv(arg("K_WORDS"), arg("CHUNK_WORDS")), multiprocessors(device))
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps) == chosen]
    return tuning_space([c for c in configs if rows * c.kwargs["BLOCK_N"] * sub_w <= GEMV_MAX_ACC * 32 * c.num_warps])


def _prune_tile(configs, named_args, **kwargs):
    """Keep the configs listed for this BLOCK_M (the first one only under the interpreter)."""
    wanted = tuning_space(TILE_CONFIGS[kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))])
    keyed = {(c.kwargs["BLOCK_N"], c.num_warps): c for c in configs}
    return [keyed[w] for w in wanted]


@triton.jit
def _load_x(x_ptr, w, word, w_end, X_DTYPE: tl.constexpr):
    """x entries of the step at word column ``w``, as four (SUB_W,) tensors of pairs: pair p of word c
    is (x[8c + 2p], x[8c + 2p + 1]) packed in one integer (int32 for 16-bit x, int64 for fp32).

    x_ptr is x viewed as int64. For 16-bit x a word's 16 bytes are one (2,) load, split in registers.
    """
    live = w + word < w_end
    # one return statement: triton 3.6 rejects returns of different types even in a dead constexpr branch
    if X_DTYPE == "fp32":
        pairs = x_ptr + (w + word) * 4
        p0, p1 = tl.load(pairs, mask=live, other=0), tl.load(pairs + 1, mask=live, other=0)
        p2, p3 = tl.load(pairs + 2, mask=live, other=0), tl.load(pairs + 3, mask=live, other=0)
    else:
        quads = x_ptr + ((w + word) * 2)[:, None] + tl.arange(0, 2)[None, :]
        low, high = tl.split(tl.load(quads, mask=live[:, None], other=0))
        p0, p1, p2, p3 = low.to(tl.int32), (low >> 32).to(tl.int32), high.to(tl.int32), (high >> 32).to(tl.int32)
    return p0, p1, p2, p3


@triton.jit
def _pair_floats(pair, X_DTYPE: tl.constexpr):
    """The two float32 x entries packed in each element of ``pair`` (from ``_load_x``): (even, odd)."""
    if X_DTYPE == "fp32":
        even = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    elif X_DTYPE == "fp16":
        even = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bf16 is the top half of a float32
        even = (pair << 16).to(tl.float32, bitcast=True)
        odd = (pair & -65536).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _accumulate_byte(
    part, part_2, words, pair, pair_2, p: tl.constexpr, lane_codes, code_ptr,
    X_DTYPE: tl.constexpr, PTX: tl.constexpr, TWO_ROWS: tl.constexpr,
):
    """part + code(element 2p) * x_even + code(element 2p + 1) * x_odd for byte p of every word (float32),
    and with TWO_ROWS the same for a second row of x (``pair_2`` into ``part_2``) from the same lookups."""
    # byte p of a word holds elements 2p (high nibble) and 2p + 1 (low nibble)
    high = lookup(lane_codes, code_ptr, words >> (8 * p + 4), PTX)
    low = lookup(lane_codes, code_ptr, words >> (8 * p), PTX)
    even, odd = _pair_floats(pair, X_DTYPE)
    part += high * even[None, :]
    part += low * odd[None, :]
    if TWO_ROWS:
        even_2, odd_2 = _pair_floats(pair_2, X_DTYPE)
        part_2 += high * even_2[None, :]
        part_2 += low * odd_2[None, :]
    return part, part_2


@triton.jit
def _split_rows(words_ptr, rn, pid_s, K_WORDS, CHUNK_WORDS, BLOCKSIZE: tl.constexpr, SUB_W: tl.constexpr):
    """For rows ``rn``: their word pointers (BLOCK_N, 1), their first quantization block, the (SUB_W,)
    word offsets of a step, and split ``pid_s``'s word columns [w_begin, w_end)."""
    rows = words_ptr + (rn.to(tl.int64) * K_WORDS)[:, None]
    first_block = rn.to(tl.int64) * (K_WORDS // (BLOCKSIZE // 8))
    w_begin = pid_s * CHUNK_WORDS
    return rows, first_block, tl.arange(0, SUB_W), w_begin, tl.minimum(w_begin + CHUNK_WORDS, K_WORDS)


@triton.jit
def _load_x_tile(x_rows, col, m_mask, w, w_end):
    """The (SUB_W * 8, BLOCK_M) tile of x at word column ``w`` (zeros past ``w_end`` and past M)."""
    cols = w * 8 + col
    return tl.load(x_rows + cols[:, None], mask=m_mask[None, :] & (cols < w_end * 8)[:, None], other=0.0)


@triton.jit
def _load_step(
    rows, first_block, n_mask, word, w, w_end, absmax_ptr, nested_absmax_ptr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SUB_W: tl.constexpr,
):
    """The (BLOCK_N, SUB_W) words at word column ``w`` and the stored absmax of the (BLOCK_N, BPS)
    quantization blocks they span, BPS = max(SUB_W / words per block, 1) (zeros past ``w_end``)."""
    WORDS_PER_BLOCK: tl.constexpr = BLOCKSIZE // 8
    BPS: tl.constexpr = max(SUB_W // WORDS_PER_BLOCK, 1)
    live = w + word < w_end
    words = tl.load(rows + (w + word)[None, :], mask=n_mask[:, None] & live[None, :], other=0)
    step_blocks = tl.arange(0, BPS)
    stored, nested = load_absmax(
        absmax_ptr, nested_absmax_ptr, first_block[:, None] + (w // WORDS_PER_BLOCK + step_blocks)[None, :],
        n_mask[:, None] & (w + step_blocks * WORDS_PER_BLOCK < w_end)[None, :], NESTED_BLOCKSIZE, DOUBLE_QUANT,
    )
    return words, stored, nested


@triton.jit
def _load_first_steps(
    rows, first_block, n_mask, word, w_begin, w_end, absmax_ptr, nested_absmax_ptr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SUB_W: tl.constexpr,
):
    """``_load_step`` at ``w_begin`` and ``w_begin + SUB_W``: the two steps a kernel has in flight before its loop."""
    words, stored, nested = _load_step(
        rows, first_block, n_mask, word, w_begin, w_end, absmax_ptr, nested_absmax_ptr,
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
    )
    words_1, stored_1, nested_1 = _load_step(
        rows, first_block, n_mask, word, w_begin + SUB_W, w_end, absmax_ptr, nested_absmax_ptr,
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
    )
    return words, stored, nested, words_1, stored_1, nested_1


@triton.jit
def _write_out(result, rm, rn, mask, n_mask, stride_om, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = result (BLOCK_M, BLOCK_N) fp32 + bias, in out's dtype."""
    if HAS_BIAS:  # rounded to out's dtype first, as F.linear adds a bias of x's dtype
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(out_ptr.dtype.element_ty)
        result += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_result(
    result, rm, rn, m_mask, n_mask, pid_s, M, N, stride_om, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_READS: tl.constexpr,
):
    """Store ``result`` (BLOCK_M, BLOCK_N) fp32 biased into out; with SPLIT, as split ``pid_s``'s partial,
    and the tile's last split to arrive writes out the sum of all its partials."""
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(partial_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :], result, mask=mask)
        # every thread's partial is stored before one thread's release on the counter (as CUTLASS's barriers do)
        tl.debug_barrier()
        tile = arrivals_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        n_splits = tl.num_programs(1)
        if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
            total = tl.zeros_like(result)
            # split order, whichever split came last: deterministic. The reads go out SPLIT_READS at a time
            # (one L2 round trip per batch, at the kernel's end); .cg reads L2, never a stale L1 line.
            for first in range(0, n_splits, SPLIT_READS):
                for i in tl.static_range(SPLIT_READS):
                    split_partial = partial_ptr + ((first + i) * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
                    live = tl.where(first + i < n_splits, mask, False)
                    total += tl.load(split_partial, mask=live, other=0.0, cache_modifier=".cg")
            tl.store(tile, 0)  # zero again for the next launch
            _write_out(total, rm, rn, mask, n_mask, stride_om, bias_ptr, out_ptr, HAS_BIAS)
    else:
        _write_out(result, rm, rn, mask, n_mask, stride_om, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def _gemv_program(
    x_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
    out_ptr, partial_ptr, arrivals_ptr,
    M, N, K_WORDS, CHUNK_WORDS, stride_xm, stride_om, rn, col, n_mask,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    X_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_READS: tl.constexpr, PDL: tl.constexpr,
    SUB_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One GEMV program: weight rows ``rn`` (BLOCK_N,) where ``n_mask``, into output columns ``col`` of out (M, N)."""
    TWO_ROWS: tl.constexpr = ROWS == 2
    pid_s = tl.program_id(1)
    rm = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    # x rows as int64 words (stride_xm counts them); a missing second row reads as zeros
    x_row = x_ptr + (tl.program_id(2) * ROWS).to(tl.int64) * stride_xm
    x_row_2 = x_row + stride_xm
    rows, first_block, word, w_begin, w_end = _split_rows(words_ptr, rn, pid_s, K_WORDS, CHUNK_WORDS, BLOCKSIZE, SUB_W)
    w_end_2 = tl.where(tl.program_id(2) * ROWS + 1 < M, w_end, 0)
    acc = tl.zeros([BLOCK_N, SUB_W], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_N, SUB_W], dtype=tl.float32)
    lane_codes = lane_code(code_ptr, PTX)
    # two steps in flight: step w + 2 SUB_W is loaded while step w is computed
    words, stored, nested, words_1, stored_1, nested_1 = _load_first_steps(
        rows, first_block, n_mask, word, w_begin, w_end, absmax_ptr, nested_absmax_ptr,
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
    )
    wait_for_producer(PDL)  # x and the split-K buffers come from earlier kernels; the weights never change
    x0, x1, x2, x3 = _load_x(x_row, w_begin, word, w_end, X_DTYPE)
    y0, y1, y2, y3 = x0, x1, x2, x3  # the second row's pairs (unused with one row)
    if TWO_ROWS:
        y0, y1, y2, y3 = _load_x(x_row_2, w_begin, word, w_end_2, X_DTYPE)
    for w in range(w_begin, w_end, SUB_W):
        words_2, stored_2, nested_2 = _load_step(
            rows, first_block, n_mask, word, w + 2 * SUB_W, w_end, absmax_ptr, nested_absmax_ptr,
            BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
        )
        next_x0, next_x1, next_x2, next_x3 = _load_x(x_row, w + SUB_W, word, w_end, X_DTYPE)
        next_y0, next_y1, next_y2, next_y3 = next_x0, next_x1, next_x2, next_x3
        if TWO_ROWS:
            next_y0, next_y1, next_y2, next_y3 = _load_x(x_row_2, w + SUB_W, word, w_end_2, X_DTYPE)
        part = tl.zeros([BLOCK_N, SUB_W], dtype=tl.float32)
        part_2 = tl.zeros([BLOCK_N, SUB_W], dtype=tl.float32)
        part, part_2 = _accumulate_byte(part, part_2, words, x0, y0, 0, lane_codes, code_ptr, X_DTYPE, PTX, TWO_ROWS)
        part, part_2 = _accumulate_byte(part, part_2, words, x1, y1, 1, lane_codes, code_ptr, X_DTYPE, PTX, TWO_ROWS)
        part, part_2 = _accumulate_byte(part, part_2, words, x2, y2, 2, lane_codes, code_ptr, X_DTYPE, PTX, TWO_ROWS)
        part, part_2 = _accumulate_byte(part, part_2, words, x3, y3, 3, lane_codes, code_ptr, X_DTYPE, PTX, TWO_ROWS)
        scale = decode_loaded_absmax(stored, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT, PTX)
        # scale (BLOCK_N, BPS): each run of SUB_W / BPS words shares one block's absmax
        BPS: tl.constexpr = scale.shape[1]
        acc += tl.reshape(tl.reshape(part, [BLOCK_N, BPS, SUB_W // BPS]) * scale[:, :, None], [BLOCK_N, SUB_W])
        if TWO_ROWS:
            acc_2 += tl.reshape(
                tl.reshape(part_2, [BLOCK_N, BPS, SUB_W // BPS]) * scale[:, :, None], [BLOCK_N, SUB_W]
            )
        words, stored, nested = words_1, stored_1, nested_1
        words_1, stored_1, nested_1 = words_2, stored_2, nested_2
        x0, x1, x2, x3 = next_x0, next_x1, next_x2, next_x3
        y0, y1, y2, y3 = next_y0, next_y1, next_y2, next_y3
    release_dependents(PDL)
    if TWO_ROWS:
        result = tl.permute(tl.join(tl.sum(acc, axis=1), tl.sum(acc_2, axis=1)), (1, 0))
    else:
        result = tl.sum(acc, axis=1)[None, :]
    _store_result(
        result, rm, col, rm < M, n_mask, pid_s, M, N, stride_om, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
        HAS_BIAS, SPLIT, SPLIT_READS,
    )


@triton.autotune(
    configs=_configs(GEMV_CONFIGS),
    key=["M", "N", "K_WORDS", "CHUNK_WORDS", "ROWS", "DOUBLE_QUANT"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    cache_results=True,
)
@triton.jit
def _gemv_kernel(
    x_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
    out_ptr, partial_ptr, arrivals_ptr,
    M, N, K_WORDS, CHUNK_WORDS, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    X_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_READS: tl.constexpr, PDL: tl.constexpr,
    SUB_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _gemv_program(
        x_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
        out_ptr, partial_ptr, arrivals_ptr, M, N, K_WORDS, CHUNK_WORDS, stride_xm, stride_om, rn, rn, rn < N,
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX, X_DTYPE, HAS_BIAS, SPLIT, SPLIT_READS, PDL, SUB_W, ROWS,
        BLOCK_N,
    )


@triton.jit
def _pick(p0, p1, p2, in_1, in_2):
    """p2 where ``in_2``, else p1 where ``in_1``, else p0 (scalars or pointers)."""
    return tl.where(in_2, p2, tl.where(in_1, p1, p0))


@triton.autotune(
    configs=_configs(GEMV_CONFIGS),
    key=["M", "N_0", "N_1", "N_2", "K_WORDS", "CHUNK_WORDS", "ROWS", "DOUBLE_QUANT"],
    prune_configs_by={"early_config_prune": _prune_gemv},
    cache_results=True,
)
@triton.jit
def _gemv_parts_kernel(
    x_ptr, words_0, words_1, words_2, absmax_0, absmax_1, absmax_2, code_0, code_1, code_2,
    nested_code_0, nested_code_1, nested_code_2, nested_absmax_0, nested_absmax_1, nested_absmax_2,
    offset_0, offset_1, offset_2, out_ptr, partial_ptr, arrivals_ptr,
    M, N_0, N_1, N_2, K_WORDS, CHUNK_WORDS, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    X_DTYPE: tl.constexpr, SPLIT: tl.constexpr, SPLIT_READS: tl.constexpr, PDL: tl.constexpr,
    SUB_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The GEMV on three weights (N_p, K) at once, out (M, N_0 + N_1 + N_2) = x @ [W_0; W_1; W_2].T: weight p
    owns the next cdiv(N_p, BLOCK_N) programs along axis 0, each part its own pointers (no bias)."""
    tiles_0 = tl.cdiv(N_0, BLOCK_N)
    tiles_01 = tiles_0 + tl.cdiv(N_1, BLOCK_N)
    pid_n = tl.program_id(0)
    in_1 = pid_n >= tiles_0
    in_2 = pid_n >= tiles_01
    rn = (pid_n - _pick(0, tiles_0, tiles_01, in_1, in_2)) * BLOCK_N + tl.arange(0, BLOCK_N)
    _gemv_program(
        x_ptr, _pick(words_0, words_1, words_2, in_1, in_2), _pick(absmax_0, absmax_1, absmax_2, in_1, in_2),
        _pick(code_0, code_1, code_2, in_1, in_2), _pick(nested_code_0, nested_code_1, nested_code_2, in_1, in_2),
        _pick(nested_absmax_0, nested_absmax_1, nested_absmax_2, in_1, in_2),
        _pick(offset_0, offset_1, offset_2, in_1, in_2), out_ptr, out_ptr, partial_ptr, arrivals_ptr,
        M, N_0 + N_1 + N_2, K_WORDS, CHUNK_WORDS, stride_xm, stride_om,
        rn, _pick(0, N_0, N_0 + N_1, in_1, in_2) + rn, rn < _pick(N_0, N_1, N_2, in_1, in_2),
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX, X_DTYPE, False, SPLIT, SPLIT_READS, PDL, SUB_W, ROWS, BLOCK_N,
    )


@triton.autotune(
    configs=_configs(sorted({c for table in TILE_CONFIGS.values() for c in table})),
    key=["M", "N", "K_WORDS", "CHUNK_WORDS", "BLOCK_M", "DOUBLE_QUANT"],
    prune_configs_by={"early_config_prune": _prune_tile},
    cache_results=True,
)
@triton.jit
def _tile_kernel(
    x_ptr, words_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
    out_ptr, partial_ptr, arrivals_ptr,
    M, N, K_WORDS, CHUNK_WORDS, stride_xm, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_READS: tl.constexpr, PDL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALE_CODES: tl.constexpr, SUB_W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rows, first_block, word, w_begin, w_end = _split_rows(words_ptr, rn, pid_s, K_WORDS, CHUNK_WORDS, BLOCKSIZE, SUB_W)
    col = tl.arange(0, SUB_W * 8)
    x_rows = x_ptr + (rm.to(tl.int64) * stride_xm)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    x_dtype: tl.constexpr = x_ptr.dtype.element_ty
    # one set is used (SCALE_CODES: shuffle lookups, else byte tables); the other is compiled away
    lane_codes = lane_code(code_ptr, PTX)
    l0, l1, l2, l3, h0, h1, h2, h3 = code_tables(code_ptr, tl.bfloat16 if SCALE_CODES else x_dtype)
    # two steps in flight, as in the GEMV
    words, stored, nested, words_1, stored_1, nested_1 = _load_first_steps(
        rows, first_block, n_mask, word, w_begin, w_end, absmax_ptr, nested_absmax_ptr,
        BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
    )
    wait_for_producer(PDL)
    x_tile = _load_x_tile(x_rows, col, m_mask, w_begin, w_end)
    for w in range(w_begin, w_end, SUB_W):
        words_2, stored_2, nested_2 = _load_step(
            rows, first_block, n_mask, word, w + 2 * SUB_W, w_end, absmax_ptr, nested_absmax_ptr,
            BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT, SUB_W,
        )
        next_x = _load_x_tile(x_rows, col, m_mask, w + SUB_W, w_end)
        scale = decode_loaded_absmax(stored, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT, PTX)
        # a step spans one quantization block (or part of one) of each row
        if SCALE_CODES:  # fp32 x: code * absmax in fp32 into the dot, as the reference rounds it
            tile = dequantize_words(words, scale, lane_codes, code_ptr, x_dtype, PTX)
            acc = tl.dot(tile, x_tile, acc, input_precision=DOT_PRECISION)
        else:  # 16-bit x: the codes alone into the dot, and the block's absmax scales the product
            codes = word_codes(words, l0, l1, l2, l3, h0, h1, h2, h3, code_ptr, x_dtype, PTX)
            acc += tl.dot(codes, x_tile, input_precision=DOT_PRECISION) * scale
        words, stored, nested = words_1, stored_1, nested_1
        words_1, stored_1, nested_1 = words_2, stored_2, nested_2
        x_tile = next_x
    release_dependents(PDL)
    _store_result(
        tl.trans(acc), rm, rn, m_mask, n_mask, pid_s, M, N, stride_om, bias_ptr, out_ptr, partial_ptr,
        arrivals_ptr, HAS_BIAS, SPLIT, SPLIT_READS,
    )


_launch_gemv = CachedLaunch(_gemv_kernel)
_launch_gemv_parts = CachedLaunch(_gemv_parts_kernel)
_launch_tile = CachedLaunch(_tile_kernel)


def split_k_chunk(M: int, N: int, K: int, block_m: int, device: torch.device) -> int:
    """Columns of K per program: all of K unless N/128 x M/BLOCK_M tiles underfill the GPU (then a multiple of
    the kernel's ``*_CHUNK_ALIGNS`` entry for an N x K weight)."""
    aligns = GEMV_CHUNK_ALIGNS if block_m in GEMV_ROWS else TILE_CHUNK_ALIGNS
    align = next(multiple for smallest, smallest_k, multiple in aligns if N * K >= smallest and K >= smallest_k)
    sms = multiprocessors(device)
    tiles = cdiv(N, 128) * cdiv(M, block_m)
    splits = min(cdiv(PROGRAMS_PER_SM * sms, tiles), cdiv(K, align))
    return cdiv(cdiv(K, max(splits, 1)), align) * align


def default_block_m(M: int) -> int:
    """The tiling ``fused_matmul`` picks for M rows: the GEMV for M <= 2 (one program per 1 or 2 rows), else 16."""
    return M if M in GEMV_ROWS else 16


_ARRIVALS: dict[tuple, list[torch.Tensor]] = {}
# Launches recorded into CUDA graphs share one buffer per device, under this key in place of a stream.
_CAPTURED = "captured"


def _grow(key: tuple, count: int, device: torch.device) -> None:
    buffers = _ARRIVALS.setdefault(key, [])
    if not buffers or buffers[-1].numel() < count:
        buffers.append(torch.zeros(max(count, 1 << 14), dtype=torch.int32, device=device))


@torch.compiler.disable  # a buffer keyed by the live stream: run eagerly, not traced into a compiled graph
def arrival_counters(count: int, device: torch.device) -> torch.Tensor:
    """At least ``count`` int32 zeros for split-K's per-tile arrival counters. Each launch leaves them at zero.

    Eager launches share a buffer per (device, stream): one stream runs them one after another. Launches
    captured into CUDA graphs share one per device, allocated and zeroed eagerly beside the eager one,
    since a buffer first allocated inside a capture would hold garbage until that graph first replays.
    (A capture always follows an eager launch of the same shapes: autotuning cannot run inside one.)
    So two such graphs must not replay at the same time on different streams. Buffers that grow are
    replaced, never freed: a captured graph keeps the old address.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        buffers = _ARRIVALS.get((device, _CAPTURED))
        if not buffers or buffers[-1].numel() < count:
            raise RuntimeError(f"split-K needs {count} arrival counters on {device} inside a CUDA graph capture; "
                               "run the same call once outside the capture first")
        return buffers[-1]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    _grow((device, stream), count, device)
    if device.type == "cuda":
        _grow((device, _CAPTURED), count, device)
    return _ARRIVALS[(device, stream)][-1]


def supports(K: int, blocksize: int) -> bool:
    """Whether the fused kernels take in_features K: whole 32-bit words and whole blocks per row."""
    return K % 8 == 0 and K % blocksize == 0


def _split_k_buffers(out: torch.Tensor, K: int, block_m: int, part_rows: list[int]) -> tuple:
    """(k_chunk, n_splits, partial, arrivals) for a launch into out (M, N) from weights of ``part_rows`` rows
    each (summing to N). Without split-K the two buffers alias out (unused)."""
    M, N = out.shape
    k_chunk = split_k_chunk(M, N, K, block_m, out.device)
    n_splits = cdiv(K, k_chunk)
    if n_splits == 1:
        return k_chunk, n_splits, out, out
    partial = torch.empty((n_splits, M, N), dtype=torch.float32, device=out.device)
    # one counter per output tile at the smallest BLOCK_N of either kernel's configs; every part starts a tile
    tiles = sum(cdiv(rows, MIN_BLOCK_N) for rows in part_rows) * cdiv(M, block_m)
    return k_chunk, n_splits, partial, arrival_counters(tiles, out.device)


def _format_meta(state, n_splits: int, device: torch.device) -> dict:
    """The constexprs (and the launch option) every fused kernel takes from the weight's format, the split count
    and the device."""
    return dict(
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize or 256, DOUBLE_QUANT=state.double_quant,
        PTX=not interpreting(), SPLIT=n_splits > 1, **pdl.launch_meta(device),
    )


def _gemv_x(x2d: torch.Tensor) -> torch.Tensor:
    """Contiguous x (M, K) viewed as the GEMV reads it, in 8-byte words (M, K * itemsize / 8) int64; copied
    first when it does not start on an 8-byte boundary."""
    if x2d.stride(0) != x2d.shape[1]:  # one row is contiguous whatever its stride (x.T of (K, 1)); view() is not
        x2d = x2d.view(x2d.shape)
    if x2d.storage_offset() * x2d.element_size() % 8:
        x2d = x2d.clone()
    return x2d.view(torch.int64)


def fused_matmul(
    x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None, block_m: int | None = None
) -> torch.Tensor:
    """``x2d @ dequant(qweight).T + bias`` in one fused launch.

    x2d: (M, K) fp32/fp16/bf16; qweight: (N, K) with ``supports(K, blocksize)``; bias: (N,) fp32/fp16/bf16 or None
    -> (M, N) in x2d.dtype. ``block_m`` is the rows of x per program: 1 or 2 run the GEMV, 16 the
    tensor-core tile kernel, 64 or 128 its large-M tiling; the default is ``default_block_m(M)``.
    Arguments are checked as ``nf4_linear`` checks them (the kernels would read past a mismatched x or bias).
    """
    check_linear_args(x2d, qweight, bias)
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D (M, K), got shape {tuple(x2d.shape)}")
    if x2d.shape[0] == 0:  # no rows: nothing to launch (the grid and split-K are sized by rows)
        return x2d.new_empty(0, qweight.shape[0])
    return _fused_matmul(x2d, qweight, bias, block_m)


def _fused_matmul(
    x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None, block_m: int | None = None
) -> torch.Tensor:
    """``fused_matmul`` on arguments already checked (by it, or by ``nf4_linear``), M >= 1."""
    check_quantized(qweight)
    M, K = x2d.shape
    N = qweight.shape[0]
    state = qweight.state
    if not supports(K, state.blocksize):
        raise ValueError(
            f"the fused kernels need in_features K divisible by 8 and by the blocksize {state.blocksize}, "
            f"got K={K}; use matmul_nf4.dequant_matmul"
        )
    block_m = default_block_m(M) if block_m is None else block_m
    if block_m not in BLOCK_MS:
        raise ValueError(f"block_m={block_m} has no configs; valid: {list(BLOCK_MS)}")
    x2d = x2d.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it as a dense (N,) array
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    k_chunk, n_splits, partial, arrivals = _split_k_buffers(out, K, block_m, [N])
    words = packed_words(qweight)
    common = dict(_format_meta(state, n_splits, x2d.device), HAS_BIAS=bias is not None)
    args = (words, *format_args(qweight), out if bias is None else bias, out, partial, arrivals)
    key = (
        M, N, K, k_chunk, block_m, state.blocksize, state.nested_blocksize, state.double_quant,
        x2d.dtype, None if bias is None else bias.dtype, x2d.stride(0),
    )
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]), n_splits, cdiv(M, block_m))  # noqa: E731
    if block_m in GEMV_ROWS:
        x_words = _gemv_x(x2d)
        _launch_gemv(
            grid, key, x_words, *args, M, N, K // 8, k_chunk // 8, x_words.stride(0), out.stride(0),
            X_DTYPE=_X_DTYPES[x2d.dtype], SUB_W=GEMV_WORDS_PER_STEP, ROWS=block_m, SPLIT_READS=GEMV_SPLIT_READS,
            **common,
        )
    else:
        _launch_tile(
            grid, key, x2d, *args, M, N, K // 8, k_chunk // 8, x2d.stride(0), out.stride(0),
            DOT_PRECISION=dot_precision(x2d.dtype), SCALE_CODES=x2d.dtype == torch.float32, BLOCK_M=block_m,
            SUB_W=min(state.blocksize // 8, TILE_WORDS_PER_STEP), SPLIT_READS=TILE_SPLIT_READS, **common,
        )
    return out


def parts_supported(x2d: torch.Tensor, qweights: list[QuantizedTensor]) -> bool:
    """Whether ``fused_matmul_parts`` takes these: M = 1 or 2 rows of fp32/fp16/bf16 x (M, K) on the weights'
    device, 2 or 3 (N_p, K) weights with ``supports(K, blocksize)``, one blocksize and one double-quantization
    layout, and packed codes that are whole 32-bit words in place (as a Llama projection's always are)."""
    if x2d.dim() != 2 or x2d.shape[0] not in GEMV_ROWS or x2d.dtype not in _X_DTYPES or len(qweights) not in (2, 3):
        return False
    first = qweights[0].state
    return all(
        len(q.shape) == 2 and q.shape[1] == x2d.shape[1] and q.packed.device == x2d.device
        and supports(q.shape[1], q.state.blocksize) and q.packed.numel() % 4 == 0 and q.packed.storage_offset() % 4 == 0
        and (q.state.blocksize, q.state.double_quant, q.state.nested_blocksize)
        == (first.blocksize, first.double_quant, first.nested_blocksize)
        for q in qweights
    )


def fused_matmul_parts(x2d: torch.Tensor, qweights: list[QuantizedTensor]) -> torch.Tensor:
    """``x2d @ cat([dequant(W) for W in qweights]).T`` in one GEMV launch, without concatenating the weights.

    x2d: (M, K), M = 1 or 2, fp32/fp16/bf16; qweights: 2 or 3 ``QuantizedTensor`` (N_p, K) that pass
    ``parts_supported`` (each may have its own codebook) -> (M, sum of N_p) in x2d.dtype. A decode step's
    q/k/v or gate/up projections: one launch streams all of them, where separate launches each pay their
    own ramp and tail (3 x 4096x4096 measured 1.5x faster at M = 1 on an H200).
    """
    if not parts_supported(x2d, qweights):
        raise ValueError(
            f"fused_matmul_parts takes 1 or 2 rows of x and 2 or 3 weights of one K and format; got x "
            f"{tuple(x2d.shape)} and weights {[tuple(q.shape) for q in qweights]}"
        )
    for q in qweights:
        check_quantized(q)
    parts = list(qweights) + [qweights[-1]] * (3 - len(qweights))  # a missing third part has 0 rows
    part_rows = [q.shape[0] for q in qweights] + [0] * (3 - len(qweights))
    (M, K), state = x2d.shape, parts[0].state
    x_words = _gemv_x(x2d.contiguous())
    out = torch.empty((M, sum(part_rows)), dtype=x2d.dtype, device=x2d.device)
    k_chunk, n_splits, partial, arrivals = _split_k_buffers(out, K, M, part_rows)
    formats = [format_args(q) for q in parts]
    pointers = [packed_words(q) for q in parts] + [f[i] for i in range(5) for f in formats]
    common = _format_meta(state, n_splits, x2d.device)
    key = (*part_rows, K, k_chunk, M, state.blocksize, state.nested_blocksize, state.double_quant, x2d.dtype)
    grid = lambda meta: (sum(cdiv(rows, meta["BLOCK_N"]) for rows in part_rows), n_splits, 1)  # noqa: E731
    _launch_gemv_parts(
        grid, key, x_words, *pointers, out, partial, arrivals,
        M, *part_rows, K // 8, k_chunk // 8, x_words.stride(0), out.stride(0),
        X_DTYPE=_X_DTYPES[x2d.dtype], SUB_W=GEMV_WORDS_PER_STEP, ROWS=M, SPLIT_READS=GEMV_SPLIT_READS, **common,
    )
    return out


def gemv_nf4(x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Small-M (1..16) entry point of ``nf4_linear``: ``fused_matmul`` with the decode tiling, without repeating
    the argument checks ``nf4_linear`` made (about 1 us a call)."""
    return _fused_matmul(x2d, qweight, bias)
