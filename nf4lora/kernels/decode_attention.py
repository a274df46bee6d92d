"""Attention of one new token per sequence over a KV cache (a decode step), split over the keys.

``decode_attention(q, k, v, mask)`` equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` for
q (B, H, 1, D), k and v (B, H_kv, L, D) with H a multiple of H_kv (grouped-query attention: query head h
reads kv head h // (H / H_kv)) and mask None or bool, broadcastable to (B, 1, 1, L) (True = attend); a
sequence whose mask holds no True gets zeros, as from SDPA.

Why a kernel of our own: with one query row, attention is a stream over the cache (2 * B * H_kv * L * D
elements), yet SDPA's kernels are built for many query rows. On an H200 in bf16 this kernel ran 1.12-1.65x
faster than SDPA's pick (cuDNN) at batch 1 for Llama-2-7B, Llama-3-8B and Llama-3-70B heads at 256-4096
cached keys, 8.1 against 12.5 us for a 7B layer's 256-slot cache, and 1.06-1.31x at batch 8 with 8 kv heads;
at batch 8 with 32 kv heads (256 sequence-heads) SDPA was faster, 0.84-0.99x
(benchmarks/results/2026-11-28_decode-attention_h200.md). ``preferred`` keeps the kernel to where it won.
Here a program owns one kv head of one sequence and a chunk of its keys, with all of that head's
query rows as the 16-row M side of ``tl.dot``; it keeps a running max, sum and weighted value sum
(fp32) over blocks of BLOCK_L keys. With several chunks a second launch combines the chunks' partial
results, each rescaled to the common maximum. Scores and sums are fp32; the probabilities are rounded
to the cache's dtype for the value product, as flash attention does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import FLOAT_DTYPES, cdiv, dot_precision, multiprocessors, next_power_of_2
from nf4lora.kernels import pdl
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.kernels.pdl import release_dependents, wait_for_producer

# keys per inner step, and the fewest keys a chunk (program) takes before the keys are split further (32 or 64 keys
# made a 7B decode step 0.6% faster, inside the run-to-run spread: 2026-11-30_decode-attention-chunking_h200.md)
BLOCK_L = 64
MIN_CHUNK = 128
# aim for this many programs per multiprocessor when choosing how many chunks to cut the keys into
PROGRAMS_PER_SM = 2
# chunks the combining launch reads at a time
COMBINE_BLOCK = 16
# the most sequences x kv heads that ``preferred`` sends here: measured ahead of SDPA up to 64, behind at 256
MAX_BATCH_HEADS = 64


@triton.jit
def _chunk_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_ptr, l_ptr,
    L, CHUNK, H_KV, sm_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_mb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b * H_kv + kv head, chunk): the GROUP query heads of that kv head over keys
    [chunk * CHUNK, min(L, (chunk + 1) * CHUNK)). Without SPLIT it writes the normalized output
    (B, H, D); with SPLIT the chunk's unnormalized sum (B, H, chunks, D), max and sum (B, H, chunks)."""
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    wait_for_producer(PDL)
    release_dependents(PDL)
    b = pid_bh // H_KV
    kv_head = pid_bh % H_KV
    rows = tl.arange(0, GROUP_PAD)
    row_mask = rows < GROUP
    d = tl.arange(0, D)
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    start = pid_c * CHUNK
    end = tl.minimum(start + CHUNK, L)
    row_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for block in range(start, end, BLOCK_L):
        keys = block + tl.arange(0, BLOCK_L)
        live = keys < end
        if HAS_MASK:
            live &= tl.load(mask_ptr + b.to(tl.int64) * stride_mb + keys, mask=live, other=0).to(tl.int1)
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kl + d[None, :], mask=(keys < end)[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vl + d[None, :], mask=(keys < end)[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # a block with no live key so far leaves the max at -inf: shift by 0 then (exp(-inf) = 0, not NaN)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    heads64 = (b * H_KV * GROUP + heads).to(tl.int64)  # flat (b, head) index
    if SPLIT:
        n_chunks = tl.num_programs(1)
        slot = heads64 * n_chunks + pid_c
        tl.store(out_ptr + slot[:, None] * D + d[None, :], acc, mask=row_mask[:, None])
        tl.store(m_ptr + slot, row_max, mask=row_mask)
        tl.store(l_ptr + slot, row_sum, mask=row_mask)
    else:
        # a row with no live key has acc 0 and sum 0: 0, as SDPA gives such a row, not 0 / 0
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(out_ptr + heads64[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _combine_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, N_CHUNKS, D: tl.constexpr, CHUNK_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b * H + head): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M = max_c m_c, reading
    the chunks CHUNK_BLOCK at a time (so no constexpr depends on how many there are)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNK_BLOCK)
    d = tl.arange(0, D)
    wait_for_producer(PDL)
    release_dependents(PDL)
    top = tl.max(tl.load(m_ptr + row * N_CHUNKS + c, mask=c < N_CHUNKS, other=float("-inf")), axis=0)
    for first in range(CHUNK_BLOCK, N_CHUNKS, CHUNK_BLOCK):
        m = tl.load(m_ptr + row * N_CHUNKS + first + c, mask=first + c < N_CHUNKS, other=float("-inf"))
        top = tl.maximum(top, tl.max(m, axis=0))
    # no chunk with a live key leaves top at -inf: shift by 0 then (exp(-inf) = 0, not NaN), as _chunk_kernel does
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([D], dtype=tl.float32)
    norm = tl.zeros([CHUNK_BLOCK], dtype=tl.float32)
    for first in range(0, N_CHUNKS, CHUNK_BLOCK):
        live = first + c < N_CHUNKS
        slot = row * N_CHUNKS + first + c
        m = tl.load(m_ptr + slot, mask=live, other=float("-inf"))
        scale = tl.exp(m - top)
        part = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        total += tl.sum(part * scale[:, None], axis=0)
        norm += tl.load(l_ptr + slot, mask=live, other=0.0) * scale
    norm_sum = tl.sum(norm, axis=0)
    # and then total is 0, and so is the output, as SDPA gives for such a row
    tl.store(out_ptr + row * D + d, (total / tl.where(norm_sum == 0.0, 1.0, norm_sum)).to(out_ptr.dtype.element_ty))


_launch_chunks = CachedLaunch(_chunk_kernel)
_launch_combine = CachedLaunch(_combine_kernel)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``decode_attention`` takes these: one query row, a power-of-two head_dim of 16..256, one
    dtype and device, H a multiple of H_kv, no empty dimension, a bool mask broadcastable to (B, 1, 1, L) or
    none, contiguous last dims."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[2] != 1 or q.dtype not in FLOAT_DTYPES:
        return False
    B, H, _, D = q.shape
    if q.numel() == 0 or k.numel() == 0 or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        return False
    if D & (D - 1) or not 16 <= D <= 256 or any(t.dtype != q.dtype or t.device != q.device for t in (k, v)):
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if mask is None:
        return True
    return (mask.dtype == torch.bool and mask.device == q.device and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
            and mask.shape[0] in (1, B) and mask.shape[3] == k.shape[2] and mask.stride(3) == 1)


def preferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether a decode step should take ``decode_attention`` over SDPA: supported, and at most
    MAX_BATCH_HEADS (sequence, kv head) pairs."""
    return supports(q, k, v, mask) and q.shape[0] * k.shape[1] <= MAX_BATCH_HEADS


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) where mask) v for q (B, H, 1, D), k, v (B, H_kv, L, D), mask (B or 1, 1, 1, L)
    bool or None -> (B, H, 1, D) in q.dtype, on tensors that ``supports`` accepts. No autograd."""
    if not supports(q, k, v, mask):
        given = {"q": q, "k": k, "v": v, "mask": mask}
        raise ValueError(
            f"decode_attention takes q (B, H, 1, D), k and v (B, H_kv, L, D), none empty, of one dtype and device, D "
            f"a power of two in 16..256, and a bool (B, 1, 1, L) mask or none; got "
            + ", ".join(f"{n} {tuple(t.shape)} {t.dtype} {t.device}" for n, t in given.items() if t is not None)
        )
    B, H, _, D = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    group = H // H_kv
    programs = B * H_kv
    chunks = max(1, min(cdiv(PROGRAMS_PER_SM * multiprocessors(q.device), programs), cdiv(L, MIN_CHUNK)))
    chunk = cdiv(cdiv(L, chunks), BLOCK_L) * BLOCK_L
    chunks = cdiv(L, chunk)
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if chunks > 1:
        part = torch.empty((B * H * chunks, D), dtype=torch.float32, device=q.device)
        row_max = torch.empty((B * H * chunks,), dtype=torch.float32, device=q.device)
        row_sum = torch.empty_like(row_max)
    else:
        part, row_max, row_sum = out, out, out
    mask_arg = q if mask is None else mask
    stride_mb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               stride_mb)
    launch = pdl.launch_meta(q.device)
    meta = dict(GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), D=D, BLOCK_L=BLOCK_L,
                HAS_MASK=mask is not None, SPLIT=chunks > 1, DOT_PRECISION=dot_precision(q.dtype), **launch)
    _launch_chunks(
        # L and chunk vary from step to step on the prefix-cache path: the key holds what Triton specializes them
        # on (divisibility by 16; chunk is a multiple of BLOCK_L) and the grid, not their values
        lambda _: (programs, chunks),
        (B, H, H_kv, D, chunks, L % 16 == 0, L == 1, q.dtype, *meta.values(), *strides),
        q, k, v, mask_arg, part, row_max, row_sum, L, chunk, H_kv, 1.0 / math.sqrt(D), *strides, **meta, num_warps=4,
    )
    if chunks > 1:
        _launch_combine(lambda _: (B * H,), (B * H, chunks, D, q.dtype), part, row_max, row_sum, out, chunks,
                        D=D, CHUNK_BLOCK=COMBINE_BLOCK, num_warps=4, **launch)
    return out
