"""Blockwise quantization (4-bit packed or 8-bit) and double quantization in two launches.

``quantize_triton(w)`` produces the same bytes as ``nf4lora.nf4.quantize`` (and so bitsandbytes):

1. one launch over ``w``: per block of ``blocksize`` elements, absmax = max|x| (float32); full blocks
   scale by ``x * (1 / absmax)``, the partial last block by ``x / absmax`` (both correctly rounded,
   ``div_rn``, with absmax clamped to 1e-38); clamp to [-1, 1]; the index is ``order[#bounds < x]``
   found by a branchless binary search over the sorted midpoints (ties take the lower code); two
   indices per byte, element 2i in the high nibble. Writes packed bytes and float32 absmax.
2. with double quantization: ``offset = absmax.mean()`` (torch, so the reduction order is torch's,
   as in the reference), then the same kernel in 8-bit mode over ``absmax - offset``: blocks of 256,
   the signed dynamic map, nearest code through the reference's bin table
   (``nf4lora.nf4.blockwise._quantize_8bit`` gives the arithmetic, which the kernel repeats op for op).

Bytes moved: n * itemsize read + n/2 + 4n/blocksize written (+ the small absmax pass).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import tuning_space
from nf4lora.kernels.launch import CachedLaunch
from nf4lora.nf4 import blockwise, codebook
from nf4lora.nf4.tensor import QuantizedTensor, QuantState, check_blocksize


def _configs() -> list[triton.Config]:
    # ELEMS = elements per program (at least one block). On an H200 the smallest tile offered
    # (2048, 4 warps) won at every benchmark shape over 4096 and 8192.
    return tuning_space(
        [
            triton.Config({"ELEMS": 2048}, num_warps=4),
            triton.Config({"ELEMS": 1024}, num_warps=2),
            triton.Config({"ELEMS": 1024}, num_warps=4),
            triton.Config({"ELEMS": 4096}, num_warps=4),
        ]
    )


@triton.autotune(configs=_configs(), key=["n_elements", "BLOCKSIZE", "EIGHT_BIT"])
@triton.jit
def _quantize_blockwise_kernel(
    # inputs
    x_ptr, offset_ptr, table_ptr, order_ptr,
    # outputs
    out_ptr, absmax_ptr,
    # sizes
    n_elements, n_blocks,
    # format: EIGHT_BIT selects the 8-bit nested pass (offset subtracted, bin table, no packing)
    BLOCKSIZE: tl.constexpr, EIGHT_BIT: tl.constexpr, LUT_BINS: tl.constexpr,
    # tiling
    ELEMS: tl.constexpr,
):
    BLOCKS: tl.constexpr = max(ELEMS // BLOCKSIZE, 1)
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if EIGHT_BIT:
        x = tl.where(mask, x - tl.load(offset_ptr), 0.0)
    absmax = tl.max(tl.abs(x), axis=1)
    if EIGHT_BIT:
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
        # NaN/Inf: the host checks absmax for NaN, so mark such blocks (tl.max may drop NaN)
        bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1)
        # 1e-38 is a float32 subnormal; a bare literal that small would be typed float64
        safe = tl.maximum(absmax, tl.full([BLOCKS], 1e-38, tl.float32))
        full = (blocks + 1) * BLOCKSIZE <= n_elements
        recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), safe)
        scaled = tl.where(full[:, None], x * recip[:, None], tl.math.div_rn(x, safe[:, None]))
        scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
        # number of the 15 sorted midpoints strictly below x, by a branchless binary search
        pos = tl.zeros([BLOCKS, BLOCKSIZE], dtype=tl.int32)
        for level in tl.static_range(4):
            step = 8 >> level
            pos += tl.where(tl.load(table_ptr + pos + (step - 1)) < scaled, step, 0)
        idx = tl.load(order_ptr + pos)
        stored = tl.where(full, absmax, safe)  # the reference stores the clamped absmax of a partial block
        tl.store(absmax_ptr + blocks, tl.where(bad > 0, float("nan"), stored), mask=blocks < n_blocks)
        HALF: tl.constexpr = BLOCKSIZE // 2
        hi, lo = tl.split(tl.reshape(idx, [BLOCKS, HALF, 2]))
        byte_offs = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
        # an odd tail pads with the code of 0.0 (masked x = 0), as the reference does
        tl.store(out_ptr + byte_offs, ((hi << 4) | lo).to(tl.uint8), mask=byte_offs < (n_elements + 1) // 2)


_launch_quantize = CachedLaunch(_quantize_blockwise_kernel)


@functools.lru_cache(maxsize=64)
def _lookup_tables(
    code_values: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code, table, order) on ``device``: for 16 codes the sorted midpoints and the sort order, for
    256 the reference's bin table (order unused). Cached so that quantizing a model's layers does not
    rebuild them (a 65536-entry search) and copy them to the device for every weight."""
    code = torch.tensor(code_values, dtype=torch.float32)  # float32 values round-trip through Python floats
    if code.numel() == 256:
        table, order = blockwise.bin_table(code).to(torch.int32), code
    else:
        table, order = codebook.quantize_bounds(code)
    return code.to(device), table.to(device), order.to(device=device, dtype=torch.int32)


def _launch(x: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None):
    """One blockwise pass. 4-bit (offset None): packed (ceil(n/2),) uint8 and absmax (nblocks,) float32.
    8-bit (nested, over ``x - offset``): indices (n,) uint8 and absmax (nblocks,) float32."""
    n = x.numel()
    n_blocks = blockwise.num_blocks(n, blocksize)
    eight_bit = offset is not None
    _, table, order = _lookup_tables(tuple(code.tolist()), x.device)
    out = torch.empty(n if eight_bit else (n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(n_blocks, max(meta["ELEMS"] // blocksize, 1)),)  # noqa: E731
    _launch_quantize(
        grid, (n, blocksize, eight_bit, x.dtype, x.device),
        x, offset if eight_bit else absmax, table, order, out, absmax, n, n_blocks,
        BLOCKSIZE=blocksize, EIGHT_BIT=eight_bit, LUT_BINS=blockwise.LUT_BINS, enable_fp_fusion=False,
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
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.numel() == 0:
        blockwise.check_float_input(w, "weight")
    check_blocksize(blocksize)
    code, quant_type = codebook.resolve_code(quant_type, code)
    code = code.cpu()
    packed, absmax = _launch(w.contiguous().reshape(-1), code, blocksize, offset=None)
    if not bool(torch.isfinite(absmax).all()):
        blockwise.check_float_input(w, "weight")  # raises with the reference's message
    # cloned: the state's tensors must not share storage across weights (safetensors refuses that)
    code = _lookup_tables(tuple(code.tolist()), w.device)[0].clone()
    state = dict(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type, code=code)
    if double_quant:
        offset = absmax.mean()
        nested_code = codebook.dynamic_map(signed=True)
        quantized, nested_absmax = _launch(absmax, nested_code, codebook.NESTED_BLOCKSIZE, offset=offset)
        nested_code = _lookup_tables(tuple(nested_code.tolist()), w.device)[0].clone()
        state.update(
            absmax=quantized, offset=offset, nested_absmax=nested_absmax, nested_code=nested_code,
            nested_blocksize=codebook.NESTED_BLOCKSIZE,
        )
    return QuantizedTensor(packed, QuantState(**state))
