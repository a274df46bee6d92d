"""Fused dequantize-matmul ``y = x @ dequant(W).T + bias`` for a 4-bit ``QuantizedTensor`` W (N, K).

One kernel serves every M, by a constexpr ``BLOCK_M``:

- ``BLOCK_M == 1`` (decode, M = 1): a GEMV on the CUDA cores. Each program streams UNROLL
  (BLOCK_N, SUB_K / 2) sub-tiles of packed bytes per step (SUB_K = min(blocksize, 64), so a sub-tile
  row has a single absmax), dequantizes them in registers and accumulates elementwise products
  against one row of x, reducing once at the end; only x, the packed weight and absmax are read.
- ``BLOCK_M >= 16`` (M = 2..16, and the fused large-M candidate timed against ``matmul_nf4``): the same
  streamed sub-tiles feed ``tl.dot`` on the tensor cores. A byte holds elements (2i, 2i+1), so a
  sub-tile splits into its high- and low-nibble halves and x into its even and odd columns, with
  no interleave: ``acc += absmax * (x_even @ code_hi.T + x_odd @ code_lo.T)``.

Split-K: when N / BLOCK_N tiles cannot fill the GPU, K is cut into ``n_splits`` chunks whose fp32
partial sums go to a (n_splits, M, N) buffer and a second launch adds them in a fixed order with
the bias (deterministic: no atomics). Otherwise the bias is fused into the single launch.

Numerics: where K is a multiple of the blocksize, a sub-tile row of SUB_K weights shares one
absmax, so it multiplies the row's partial dot product once instead of every weight: the GEMV
computes ``absmax * sum(code[idx] * x)`` in fp32 (the weight is never rounded), the tensor-core
path ``absmax * (x @ code[idx].T)`` with the codes rounded to x.dtype (bf16: 2**-9 relative, the
size of the reference's own rounding of the dequantized weight). Results match the reference
within the dtype's matmul tolerance, not bit for bit; fp32 x uses an IEEE fp32 dot, not tf32.
Where blocks straddle rows each weight is dequantized as the reference does, then multiplied.
Needs K even (rows start on a byte); ``nf4_linear`` routes odd K to ``matmul_nf4.dequant_matmul``.

Bytes moved: N*K/2 packed + absmax + M*K*itemsize x + M*N*itemsize out. Measured on an H200
(benchmarks/results/2026-11-28_kernels-subset_h200.md): M = 1 streams the 7B/70B projections at
0.5-0.66 TB/s (0.18-0.21 ms at 28672x8192), 0.5-0.65x the speed of bitsandbytes' GEMV and bf16
F.linear; the per-element LUT gather and unpacking keep it issue-bound, far from copy bandwidth.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dequantize_nf4 import check_quantized, decode_absmax, format_args
from nf4lora.kernels.dispatch import interpreting, tuning_space
from nf4lora.nf4.tensor import QuantizedTensor

# K chunks for split-K are multiples of this, so every step (SUB_K * UNROLL <= 512) tiles a chunk exactly
K_CHUNK_ALIGN = 1024
# aim for this many programs per multiprocessor before splitting K further
PROGRAMS_PER_SM = 4

_CONFIGS = {
    # (BLOCK_N, UNROLL, num_warps, num_stages) per BLOCK_M; the first entry is the interpreter's.
    # A step reads UNROLL sub-tiles of (BLOCK_N, SUB_K / 2) bytes: each row of a sub-tile is one
    # quantization block (or a slice of one), so its absmax is one value per row.
    # Software pipelining (num_stages > 1) would stage the LUT and absmax gathers through shared
    # memory too (up to 540 KB at BLOCK_M 16), so the small-M configs mostly rely on occupancy.
    1: [(64, 2, 4, 1), (128, 2, 4, 1), (64, 4, 4, 1), (128, 4, 8, 1), (256, 2, 8, 1), (64, 2, 4, 2), (32, 4, 4, 1)],
    16: [(64, 2, 4, 1), (128, 2, 4, 1), (64, 4, 4, 1), (128, 2, 8, 1), (32, 4, 4, 1), (64, 2, 4, 2)],
    64: [(64, 1, 4, 3), (128, 1, 4, 3), (128, 2, 8, 3)],
    128: [(128, 1, 8, 3), (128, 2, 8, 3)],
}
SUB_K_MAX = 64  # columns per sub-tile (fewer when the blocksize is smaller)


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_N": n, "UNROLL": u}, num_warps=w, num_stages=s)
        for n, u, w, s in sorted({c for table in _CONFIGS.values() for c in table})
    ]


def _prune(configs, named_args, **kwargs):
    """Keep the configs listed for this BLOCK_M (the first one only under the interpreter)."""
    wanted = tuning_space(_CONFIGS[kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))])
    keyed = {(c.kwargs["BLOCK_N"], c.kwargs["UNROLL"], c.num_warps, c.num_stages): c for c in configs}
    return [keyed[w] for w in wanted]


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "K_CHUNK", "BLOCK_M", "DOUBLE_QUANT", "ALIGNED"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _nf4_matmul_kernel(
    # inputs
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
    # outputs: out (M, N) when not split, else fp32 partials (n_splits, M, N)
    out_ptr, partial_ptr,
    # sizes and strides
    M, N, K, K_CHUNK, stride_xm, stride_om,
    # format
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    PTX: tl.constexpr,
    # epilogue
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, UNROLL: tl.constexpr,
):
    SUB_BYTES: tl.constexpr = SUB_K // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    row_start = rn.to(tl.int64) * K  # flat element index of W[n, 0]; even because K is even
    row_bytes = packed_ptr + (row_start // 2)[:, None]
    sub_byte = tl.arange(0, SUB_BYTES)
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm

    k_begin = pid_s * K_CHUNK
    k_end = tl.minimum(k_begin + K_CHUNK, K)
    if BLOCK_M == 1:
        # elementwise products accumulate in the tile's shape; one reduction after the loop
        acc = tl.zeros([BLOCK_N, SUB_BYTES], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, SUB_K * UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u * SUB_K
            col_byte = k // 2 + sub_byte
            byte_mask = n_mask[:, None] & (col_byte < k_end // 2)[None, :]
            packed = tl.load(row_bytes + col_byte[None, :], mask=byte_mask, other=0).to(tl.int32)
            code_hi = tl.load(code_ptr + (packed >> 4))
            code_lo = tl.load(code_ptr + (packed & 0xF))
            x_col = k + 2 * sub_byte
            x_mask = x_col < k_end
            if BLOCK_M == 1:
                x_even = tl.load(x_ptr + x_col, mask=x_mask, other=0.0).to(tl.float32)[None, :]
                x_odd = tl.load(x_ptr + x_col + 1, mask=x_mask, other=0.0).to(tl.float32)[None, :]
            else:
                xm = m_mask[:, None] & x_mask[None, :]
                x_even = tl.load(x_rows[:, None] + x_col[None, :], mask=xm, other=0.0)
                x_odd = tl.load(x_rows[:, None] + x_col[None, :] + 1, mask=xm, other=0.0)
            if ALIGNED:
                # K % BLOCKSIZE == 0: a sub-tile row lies in one block, so its absmax factors out of
                # the row's dot product and multiplies once per row instead of once per element
                row_scale = decode_absmax(
                    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, (row_start + k) // BLOCKSIZE,
                    n_mask & (k + 0 * rn < k_end), NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
                )
                if BLOCK_M == 1:
                    acc += row_scale[:, None] * (code_hi * x_even + code_lo * x_odd)
                else:
                    part = tl.dot(x_even, tl.trans(code_hi.to(x_ptr.dtype.element_ty)), input_precision=DOT_PRECISION)
                    part += tl.dot(x_odd, tl.trans(code_lo.to(x_ptr.dtype.element_ty)), input_precision=DOT_PRECISION)
                    acc += part * row_scale[None, :]
            else:  # blocks straddle rows: one absmax per byte, applied to each weight
                scale = decode_absmax(
                    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                    (row_start[:, None] + 2 * col_byte[None, :]) // BLOCKSIZE, byte_mask,
                    NESTED_BLOCKSIZE, DOUBLE_QUANT, PTX,
                )
                if BLOCK_M == 1:
                    acc += (code_hi * scale) * x_even + (code_lo * scale) * x_odd
                else:
                    w_hi = (code_hi * scale).to(x_ptr.dtype.element_ty)
                    w_lo = (code_lo * scale).to(x_ptr.dtype.element_ty)
                    acc += tl.dot(x_even, tl.trans(w_hi), input_precision=DOT_PRECISION)
                    acc += tl.dot(x_odd, tl.trans(w_lo), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        result = tl.sum(acc, axis=1)[None, :]
    else:
        result = acc

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(partial_ptr + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :], result, mask=out_mask)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(out_ptr.dtype.element_ty)
            result += bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr, M, N, n_splits, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_splits):  # fixed order: deterministic
        acc += tl.load(partial_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_chunk(M: int, N: int, K: int, block_m: int, device: torch.device) -> int:
    """Columns of K per program: all of K unless N/32 x M/BLOCK_M tiles underfill the GPU."""
    sms = 4 if interpreting() or device.type != "cuda" else _multiprocessors(device.index or 0)
    tiles = triton.cdiv(N, 32) * triton.cdiv(M, block_m)
    splits = min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), triton.cdiv(K, K_CHUNK_ALIGN))
    return triton.cdiv(triton.cdiv(K, max(splits, 1)), K_CHUNK_ALIGN) * K_CHUNK_ALIGN


def fused_matmul(
    x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None, block_m: int | None = None
) -> torch.Tensor:
    """``x2d @ dequant(qweight).T + bias`` in one fused launch (two with split-K).

    x2d: (M, K) fp32/fp16/bf16; qweight: (N, K), K even; bias: (N,) or None -> (M, N) in x2d.dtype.
    ``block_m`` defaults to 1 for M == 1 and 16 otherwise; 64 or 128 give the large-M fused variant.
    """
    check_quantized(qweight)
    M, K = x2d.shape
    N = qweight.shape[0]
    if K % 2:
        raise ValueError(f"the fused kernel needs an even in_features, got K={K}; use matmul_nf4.dequant_matmul")
    block_m = (1 if M == 1 else 16) if block_m is None else block_m
    if block_m not in _CONFIGS:
        raise ValueError(f"block_m={block_m} has no configs; valid: {sorted(_CONFIGS)}")
    x2d = x2d.contiguous()
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    k_chunk = split_k_chunk(M, N, K, block_m, x2d.device)
    n_splits = triton.cdiv(K, k_chunk)
    partial = torch.empty((n_splits, M, N), dtype=torch.float32, device=x2d.device) if n_splits > 1 else out
    state = qweight.state
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_splits, triton.cdiv(M, block_m))  # noqa: E731
    _nf4_matmul_kernel[grid](
        x2d, qweight.packed, *format_args(qweight), out if bias is None else bias, out, partial,
        M, N, K, k_chunk, x2d.stride(0), out.stride(0),
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize or 256,
        DOUBLE_QUANT=state.double_quant, ALIGNED=K % state.blocksize == 0,
        PTX=not interpreting(), HAS_BIAS=bias is not None, SPLIT=n_splits > 1,
        DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, SUB_K=min(state.blocksize, SUB_K_MAX),
    )
    if n_splits > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(M * N, block),)](
            partial, out if bias is None else bias, out, M, N, n_splits, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out


def gemv_nf4(x2d: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Small-M (1..16) entry point of ``nf4_linear``: ``fused_matmul`` with the decode tiling."""
    return fused_matmul(x2d, qweight, bias)
