"""Blockwise absmax quantization to a codebook, and its inverse (pure PyTorch, any device).

This is the reference the Triton kernels are checked against. It is bit-exact with bitsandbytes' CPU path
(`quantize_4bit` and `quantize_blockwise`; tests/nf4/test_quantize.py), which uses two different algorithms, so
there are two here, chosen by the codebook's size:

4-bit codebooks (at most 16 entries), exact nearest code:
- the input is upcast to float32 and flattened in row-major order; absmax per block of `blocksize` elements;
- full blocks are scaled by `x * (1 / absmax)`, the partial last block by `x / absmax` (the two can differ in the
  last bit, which can flip a code); the reciprocal is guarded with `absmax.clamp(min=1e-38)`. So an all-zero block
  maps to the code nearest 0.0; its stored absmax is 0 for a full block and 1e-38 for a partial one.
  (bitsandbytes' CUDA path stores different codes for all-zero blocks; we follow the CPU path.)
- scaled values are clamped to [-1, 1] and mapped to the nearest code, ties to the lower one
  (`codebook.quantize_bounds`).

8-bit codebooks (256 entries, the dynamic map), through a 65536-bin table:
- every block, the partial one too, is scaled by `x * (1 / absmax)` and clamped to [-1, 1];
- the scaled value selects bin `trunc((v + 1) * 0.5 * 65535 + 0.5)` of a table that holds, for each bin centre
  `-1 + 2 i / 65535`, the index of the nearest code (ties to the lower one). That is not always the code nearest
  the value itself (near zero, where the dynamic map is denser than the bins), but it is bitsandbytes' result.
- an all-zero block stores absmax 0 and index 0.

Dequantization is `code[idx] * absmax[block]` in float32, cast once to the output dtype, for both. That equals
bitsandbytes' CUDA and pure-PyTorch dequantizers everywhere; its C++ CPU dequantizer indexes absmax per row and
differs when a row is not a whole number of blocks.
"""

from __future__ import annotations

import torch

from .codebook import quantize_bounds

_TINY = 1e-38  # reciprocal guard for all-zero blocks, bitsandbytes' value
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what can be quantized


def check_float_input(x: torch.Tensor, what: str = "input") -> None:
    """Refuse what cannot be quantized: non-tensors, non-float dtypes, empty tensors, NaN or Inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"cannot quantize {what} of type {type(x).__name__}; valid: torch.Tensor of float32, float16, bfloat16"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cannot quantize {what} of dtype {x.dtype}; valid: float32, float16, bfloat16")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty {what} (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"cannot quantize {what} with {bad} NaN or Inf values; quantization needs finite numbers")


def num_blocks(numel: int, blocksize: int) -> int:
    """ceil(numel / blocksize): the number of absmax values of a tensor of `numel` elements."""
    return -(-numel // blocksize)


def blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (nblocks,) float32 and the input scaled into [-1, 1], (n,) float32; `flat` is (n,) float32."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    return absmax, scaled.clamp(-1.0, 1.0)


def code_lookup(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`nearest_code`'s tables for a (C <= 16,) float32 codebook: the midpoints (C-1,) float32 and the sorted
    position -> code index map (C,) uint8, or None for an ascending codebook such as NF4 (the map is the identity)."""
    bounds, order = quantize_bounds(code)
    ascending = order.cpu().tolist() == list(range(order.numel()))
    return bounds, None if ascending else order.to(torch.uint8)


def nearest_code(scaled: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Index of the nearest code for each value of `scaled` (ties to the lower code), as uint8; `bounds` and
    `order` come from `code_lookup`."""
    sorted_index = torch.bucketize(scaled, bounds, out_int32=True, right=False)
    return sorted_index.to(torch.uint8) if order is None else order[sorted_index]


# Elements per step of `quantize_packed`: a multiple of every blocksize, so that a step holds whole blocks, and small
# enough that a step's float32 and index temporaries (about 30 bytes an element, 8 MB) stay well under one weight.
# Quantizing whole weights at once held 30 bytes per element of the largest one. Speed is the same within noise: a
# 2816x1024 bf16 weight on one CPU thread took 77-86 ms in these steps, 83-89 ms at once (94-96 ms before the int32
# bucketize and the skipped identity gather).
QUANTIZE_STEP = 1 << 18


def quantize_packed(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit blockwise quantization of `flat` (n,) float32/float16/bfloat16, QUANTIZE_STEP elements at a time.

    Returns packed (ceil(n / 2),) uint8 (element 2i in the high nibble; an odd tail pads with the code of 0.0, as
    bitsandbytes does) and absmax (ceil(n / blocksize),) float32. `code` is (C <= 16,) float32 on flat's device.
    """
    n = flat.numel()
    bounds, order = code_lookup(code)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, QUANTIZE_STEP):
        step_absmax, scaled = blockwise_absmax_and_scaled(flat[start : start + QUANTIZE_STEP].float(), blocksize)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed[start // 2 : start // 2 + scaled.numel() // 2] = pack_nibbles(nearest_code(scaled, bounds, order))
        absmax[start // blocksize : start // blocksize + step_absmax.numel()] = step_absmax
    return packed, absmax


LUT_BINS = 65536
_bin_tables: dict[tuple, torch.Tensor] = {}


def bin_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: for each bin centre of [-1, 1], the index of the nearest entry of a sorted 256-entry code.

    Cached per codebook value and device: optimizers and double quantization look it up on every call.
    """
    key = (str(code.device), tuple(code.tolist()))
    if key not in _bin_tables:
        midpoints = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32, device=code.device)) / (LUT_BINS - 1)
        _bin_tables[key] = torch.searchsorted(midpoints, centres, right=False)
    return _bin_tables[key]


def _quantize_8bit(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, num_blocks(n, blocksize) * blocksize - n)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1.0, 1.0)
    bins = ((scaled + 1.0) * 0.5 * (LUT_BINS - 1) + 0.5).long()
    indices = bin_table(code)[bins.clamp(0, LUT_BINS - 1)]
    indices[absmax == 0] = 0
    return indices.reshape(-1)[:n].to(torch.uint8), absmax


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of `x` to indices into `code` (the module docstring gives the arithmetic).

    Args:
        x: any shape, float32/float16/bfloat16, finite.
        code: (C,) float32 codebook: C <= 16 (4-bit, any order) or C == 256 (8-bit, sorted ascending).
        blocksize: elements per absmax block.
    Returns:
        indices: (n,) uint8, n = x.numel(), row-major.
        absmax: (ceil(n / blocksize),) float32.
    """
    flat = x.reshape(-1).float()
    code = code.to(device=flat.device, dtype=torch.float32)
    if code.numel() == 256:
        return _quantize_8bit(flat, code, blocksize)
    if code.numel() > 16:
        raise ValueError(f"codebook has {code.numel()} entries; valid: at most 16 (4-bit) or exactly 256 (8-bit)")
    absmax, scaled = blockwise_absmax_and_scaled(flat, blocksize)
    return nearest_code(scaled, *code_lookup(code)), absmax


def dequantize_blockwise(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: (n,) `dtype` values `code[indices] * absmax[block]` (float32 math)."""
    n = indices.numel()
    values = code.to(device=indices.device, dtype=torch.float32)[indices.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """(2m,) uint8 4-bit indices -> (m,) uint8 bytes, element 2i in the high nibble (codebook.py's note)."""
    pairs = indices.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """(ceil(numel/2),) uint8 bytes -> (numel,) uint8 4-bit indices, the inverse of `pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
