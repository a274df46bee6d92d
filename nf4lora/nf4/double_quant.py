"""Double quantization: the float32 absmax of the first level, quantized again to 8 bits (QLoRA, section 3).

`offset = mean(absmax)` is subtracted, then the centred values are quantized blockwise (NESTED_BLOCKSIZE = 256 per
block) to the nearest entry of the signed dynamic map, exactly as `blockwise.quantize_blockwise` does for any
codebook. Storage per first-level block drops from 32 bits to 8 + 32/256 bits.

Error term, derived from the 8-bit arithmetic in blockwise.py: a centred absmax scaled into [-1, 1] lands in a
bin of width 2/65535, whose centre is at most 1/65535 away, and the bin maps to the code nearest its centre, at most
half the widest gap of the dynamic map G away (G = 0.0141, in its top decade). So a decoded absmax differs from the
true one by at most `(G / 2 + 1 / 65535) * nested_absmax[nested block]`, plus float32 rounding. An element's error
is then at most `max_gap(code) / 2 * absmax + |absmax - decoded absmax|`, since |code| <= 1
(tests/nf4/test_properties.py checks exactly this bound).
"""

from __future__ import annotations

import torch

from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebook import NESTED_BLOCKSIZE, dynamic_map


def refuse_overflowing_mean(absmax: torch.Tensor) -> None:
    """Raise for finite block absmax (nblocks,) float32 whose mean, the double quantization's offset, overflows."""
    raise ValueError(
        f"double quantization needs mean(absmax), which overflows float32 (absmax up to "
        f"{float(absmax.max()):.3g}); valid: weights whose mean block absmax is finite, or double_quant=False"
    )


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a first-level absmax.

    Args:
        absmax: (nblocks,) float32.
    Returns:
        quantized: (nblocks,) uint8 indices into `nested_code`.
        offset: 0-d float32, the mean that was subtracted.
        nested_absmax: (ceil(nblocks / 256),) float32.
        nested_code: (256,) float32, the signed dynamic map.
    """
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        refuse_overflowing_mean(absmax)
    nested_code = dynamic_map(signed=True).to(absmax.device)
    quantized, nested_absmax = quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return quantized, offset, nested_absmax, nested_code


def decompress_absmax(
    quantized: torch.Tensor,
    offset: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """(nblocks,) float32 absmax decoded from its 8-bit form: `nested_code[q] * nested_absmax[block] + offset`."""
    centred = dequantize_blockwise(quantized, nested_absmax, nested_code, nested_blocksize, torch.float32)
    return centred + offset.float()
