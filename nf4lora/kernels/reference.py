"""Pure-PyTorch reference paths for every kernel op; they run on any device.

Each is the definition its Triton kernel is tested against (see tests/kernels) and the CPU
fallback the dispatcher uses. The format itself (codebooks, block layout, nibble order, double
quantization) is defined once in ``nf4lora.nf4``; these functions only compose it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nf4lora.nf4 import tensor as nf4_tensor


def quantize_reference(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    code: torch.Tensor | None = None,
) -> nf4_tensor.QuantizedTensor:
    """``nf4lora.nf4.quantize``: ``w`` any shape, float dtype -> ``QuantizedTensor``."""
    return nf4_tensor.quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant, code=code)


def dequantize_reference(q: nf4_tensor.QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``code[idx] * absmax[block]`` in float32, cast once to ``dtype`` (default ``q.dtype``); shape ``q.shape``."""
    return nf4_tensor.dequantize(q, dtype)


def linear_reference(
    x: torch.Tensor, qweight: nf4_tensor.QuantizedTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, dequant(W).to(x.dtype), bias)``: x (..., K), W (N, K), bias (N,) -> (..., N) in x.dtype."""
    return F.linear(x, dequantize_reference(qweight, x.dtype), None if bias is None else bias.to(x.dtype))
