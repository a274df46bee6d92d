"""Rotary embedding of q and k plus the KV-cache write, in one launch, for inference with a cache.

``rope_into_cache(q, k, v, cos, signed_sin, k_cache, v_cache, cache_position)`` does what the model's attention
does eagerly before attending::

    q_rot = apply_rope(q, cos, signed_sin)                      # returned, (B, H, T, D) contiguous
    k_cache[:, :, cache_position] = apply_rope(k, cos, signed_sin)
    v_cache[:, :, cache_position] = v

for q (B, T, H, D), k and v (B, T, H_kv, D) (views of the projections' outputs: rows may be strided, each
head's D values contiguous), cos and signed_sin (B, T, D) from ``model.rope.rope_cos_sin``, caches
(B, H_kv, max_len, D) and cache_position (T,) int64 slots. A slot outside [0, max_len) is not written (the
eager ``index_copy_`` raises there; checking the values would wait for the GPU). Rounding is the eager
expression's, step by step (``x * cos`` and ``roll(x) * sin`` each rounded to x.dtype, then their sum), so the
results are bitwise equal.

Why: eagerly that is eight kernels for the two rotations (two products, a roll and a sum each) and two
``index_copy_``; in a replayed decode step each costs a few microseconds of launch-to-launch time. Here a
program rotates one head of one token: query heads into the output, key heads (with their value head) into
the caches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import FLOAT_DTYPES, next_power_of_2
from nf4lora.kernels import pdl
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.kernels.pdl import release_dependents, wait_for_producer


@triton.jit
def _rotate(x_row, cos, sin, cols, live, D: tl.constexpr):
    """x * cos + roll(x, D / 2) * sin for one head (BLOCK,), each product and the sum rounded to x's dtype."""
    x = tl.load(x_row + cols, mask=live, other=0.0)
    rolled = tl.load(x_row + (cols + D // 2) % D, mask=live, other=0.0)
    dtype = x.dtype
    a = (x.to(tl.float32) * cos).to(dtype)
    b = (rolled.to(tl.float32) * sin).to(dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(dtype)


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr,
    T, H, H_KV, MAX_LEN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_cacheb, stride_cacheh, stride_cachel,
    D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b * T + t, head): query head ``head`` < H into q_out, else kv head ``head - H`` into the caches."""
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    cols = tl.arange(0, BLOCK)
    live = cols < D
    wait_for_producer(PDL)
    release_dependents(PDL)
    cos = tl.load(cos_ptr + b * stride_cb + t * stride_ct + cols, mask=live, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_cb + t * stride_ct + cols, mask=live, other=0.0).to(tl.float32)
    if head < H:
        rotated = _rotate(q_ptr + b * stride_qb + t * stride_qt + head * stride_qh, cos, sin, cols, live, D)
        tl.store(q_out_ptr + ((b * H + head) * T + t) * D + cols, rotated, mask=live)
    else:
        kv_head = head - H
        slot = tl.load(pos_ptr + t)
        cache_offset = b * stride_cacheb + kv_head * stride_cacheh + slot * stride_cachel + cols
        # a bad slot must not write over the next cache (tl.where, not &: the interpreter's scalar & block is int32)
        in_cache = tl.where((slot >= 0) & (slot < MAX_LEN), live, False)
        rotated = _rotate(k_ptr + b * stride_kb + t * stride_kt + kv_head * stride_kh, cos, sin, cols, live, D)
        tl.store(k_cache_ptr + cache_offset, rotated.to(k_cache_ptr.dtype.element_ty), mask=in_cache)
        v = tl.load(v_ptr + b * stride_vb + t * stride_vt + kv_head * stride_vh + cols, mask=live, other=0.0)
        tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=in_cache)


_launch = CachedLaunch(_rope_cache_kernel)


def rope_into_cache_reference(q, k, v, cos, signed_sin, k_cache, v_cache, cache_position) -> torch.Tensor:
    """The eager ops: rotate q and k (B, T, heads, D), write k and v at ``cache_position``; return q rotated."""
    from nf4lora.model.rope import apply_rope

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
    k_cache.index_copy_(2, cache_position, k.to(k_cache.dtype))
    v_cache.index_copy_(2, cache_position, v.to(v_cache.dtype))
    return q


def supports(q, k, v, cos, k_cache, v_cache) -> bool:
    """Whether the kernel takes these: one fp32/fp16/bf16 dtype for q, k, v, cos and the caches, heads of
    contiguous D values, H_kv cache heads, and everything on one device."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return False
    (b, t, _, d), h_kv = q.shape, k.shape[2]
    tensors = (q, k, v, cos, k_cache, v_cache)
    return (
        q.dtype in FLOAT_DTYPES and all(x.dtype == q.dtype and x.device == q.device for x in tensors)
        and k.shape[:2] == (b, t) and k.shape[3] == d and tuple(cos.shape) == (b, t, d)
        and k_cache.shape[0] == b and k_cache.shape[1] == h_kv and k_cache.shape[3] == d
        and all(x.stride(-1) == 1 for x in tensors) and k_cache.stride() == v_cache.stride()
    )


def rope_into_cache(q, k, v, cos, signed_sin, k_cache, v_cache, cache_position) -> torch.Tensor:
    """Rotate q and k by cos/signed_sin, write k and v into the caches at ``cache_position`` (T,); return q rotated
    as (B, H, T, D) contiguous. Shapes and dtypes as in the module docstring (``supports``)."""
    sin_like_cos = (signed_sin.shape == cos.shape and signed_sin.stride() == cos.stride()
                    and signed_sin.dtype == cos.dtype and signed_sin.device == cos.device)
    if not sin_like_cos or not supports(q, k, v, cos, k_cache, v_cache):
        given = {"q": q, "k": k, "v": v, "cos": cos, "sin": signed_sin, "k_cache": k_cache, "v_cache": v_cache}
        raise ValueError(
            f"rope_into_cache takes q (B, T, H, D), k and v (B, T, H_kv, D), cos and sin (B, T, D) of one layout and "
            f"caches (B, H_kv, L, D), all of one dtype and device; got "
            + ", ".join(f"{n} {tuple(t.shape)} {t.dtype} {t.device}" for n, t in given.items())
        )
    # the kernel reads one slot per token: a shorter cache_position would be read past its end
    if tuple(cache_position.shape) != q.shape[1:2] or cache_position.dtype != torch.int64:
        raise ValueError(f"rope_into_cache: cache_position must be (T,) = ({q.shape[1]},) int64 slots; got "
                         f"{tuple(cache_position.shape)} {cache_position.dtype}")
    b, t, h, d = q.shape
    h_kv = k.shape[2]
    pos = cache_position.to(q.device)
    q_out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2], *k_cache.stride()[:3])
    launch = pdl.launch_meta(q.device)
    max_len = k_cache.shape[2]
    key = (b, t, h, h_kv, d, max_len, strides, q.dtype)
    _launch(
        lambda meta: (b * t, h + h_kv), key, q, k, v, cos, signed_sin, q_out, k_cache, v_cache, pos,
        t, h, h_kv, max_len, *strides, D=d, BLOCK=next_power_of_2(d), num_warps=1, enable_fp_fusion=False,
        **launch,
    )
    return q_out
