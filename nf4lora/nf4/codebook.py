"""Codebooks: the 16-value 4-bit tables (NF4, FP4) and the 256-value dynamic 8-bit map.

Every table here is computed, not pasted, and equals bitsandbytes' table bit for bit (tests/nf4/test_codebook.py).
A codebook is plain data: a float32 tensor, sorted or not. Nothing downstream assumes NF4's values; the quantizers
only need `quantize_bounds(code)`, so a researcher can pass any 16-entry table.

Note (format, defined once): a 4-bit code is an index into the codebook. Two indices share a byte, the element with
the lower flat index in the HIGH nibble (`byte = idx[2i] << 4 | idx[2i + 1]`), as bitsandbytes packs them.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = tuple(2**p for p in range(5, 13))  # 32 ... 4096, the range bitsandbytes accepts for 4-bit
NESTED_BLOCKSIZE = 256  # blocksize of the second level (absmax) quantization, as in bitsandbytes

# QLoRA's normal-float offset: the outermost quantile probability. bitsandbytes uses 0.9677083, which is
# 1/2 * (1 - 1/(2*15)) + 1/2 * (1 - 1/(2*16)) rounded, the mean of the offsets for 15 and 16 levels.
NF4_OFFSET = 0.9677083


@functools.cache
def _nf4_code() -> torch.Tensor:
    # 8 positive quantiles and 7 negative ones of N(0, 1), equally spaced in probability from NF4_OFFSET to 0.5
    # (the 0.5 end dropped, it is the exact zero added below), normalised so the largest is 1.
    # The probabilities are float32 (torch.linspace's default), the quantile function float64, then the table is
    # rounded to float32 before normalisation; that order reproduces bitsandbytes' table exactly.
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


@functools.cache
def _fp4_code() -> torch.Tensor:
    # bitsandbytes' FP4 is e2m1 with a sign bit on top (bit 3) and an unusual exponent encoding: the exponent
    # field e = bits 2..1 gives 2**(4 - e) for e = 1, 2, 3 (8, 4, 2) and the subnormal range for e = 0 (0 and
    # 0.0625); the mantissa bit m (bit 0) multiplies normal values by (1 + m/2). The table is divided by its
    # largest magnitude (12) in float32.
    magnitudes = []
    for index in range(8):
        exponent, mantissa = index >> 1, index & 1
        magnitudes.append(0.0625 * mantissa if exponent == 0 else 2.0 ** (4 - exponent) * (1 + mantissa / 2))
    # index 8, the "negative zero" pattern, holds +0.0 as in bitsandbytes' table (written there as the integer -0)
    values = torch.tensor(magnitudes + [-m if m else 0.0 for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def nf4_code() -> torch.Tensor:
    """The NF4 codebook: (16,) float32, sorted, from -1 to 1 with an exact 0 at index 7."""
    return _nf4_code().clone()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 codebook: (16,) float32 in sign-magnitude order (index 8..15 = -(index 0..7))."""
    return _fp4_code().clone()


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 codebook of `quant_type` ("nf4" or "fp4")."""
    if quant_type == "nf4":
        return nf4_code()
    if quant_type == "fp4":
        return fp4_code()
    raise ValueError(f"unknown quant_type {quant_type!r}; valid: {', '.join(QUANT_TYPES)}")


def resolve_code(quant_type: str, code: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """The codebook to quantize with and the quant_type to record: `quant_type`'s table, or a custom `code`.

    A custom codebook must be (16,) float32 with values in [-1, 1]; it is recorded as quant_type "custom".
    """
    if code is None:
        return get_code(quant_type), quant_type
    if not isinstance(code, torch.Tensor) or code.shape != (16,) or code.dtype != torch.float32:
        got = f"{tuple(code.shape)} {code.dtype}" if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"a custom codebook must be (16,) float32 (a torch.Tensor), got {got}")
    outside = code[~((code >= -1) & (code <= 1))]  # NaN fails both comparisons
    if outside.numel():
        raise ValueError(f"custom codebook values must be finite and in [-1, 1], got {outside.tolist()}")
    return code.detach(), "custom"  # a codebook that requires grad must not put the weights in an autograd graph


@functools.cache
def _dynamic_map(signed: bool) -> torch.Tensor:
    # Dettmers' dynamic tree quantization (arXiv:1511.04561) with bitsandbytes' parameters: 8 bits, at most 7
    # exponent bits. Exponent level i (0..6) covers a decade 10**(i - 6) with an evenly spaced fraction whose
    # bit count grows with i; the entries are the midpoints of linspace(0.1, 1) subintervals, scaled by the decade.
    # The signed map mirrors every positive entry. Then 0 and 1 are added, the table is zero-padded to 256
    # entries and sorted. Arithmetic mirrors bitsandbytes': float32 linspace, means and scaling.
    total_bits, max_exponent_bits = 8, 7
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for level in range(max_exponent_bits):
        exponent_bits = level + non_sign_bits - max_exponent_bits
        fraction_items = 2**exponent_bits + 1 if signed else 2 ** (exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + level)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map: (256,) float32, sorted. Signed in [-1, 1], unsigned in [0, 1]."""
    return _dynamic_map(signed).clone()


def quantize_bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code lookup tables for any codebook.

    Args:
        code: (C,) float32 codebook, any order.
    Returns:
        bounds: (C-1,) float32 midpoints between neighbouring sorted codes.
        order: (C,) int64, sorted position -> code index.
    A scaled value x maps to `order[bucketize(x, bounds, right=False)]`: the number of midpoints strictly below x.
    A value exactly on a midpoint therefore takes the lower code, as bitsandbytes resolves ties.
    """
    if code.dim() != 1 or code.numel() < 2 or code.dtype != torch.float32:
        raise ValueError(f"codebook must be a 1-D float32 tensor of at least 2 values, got {tuple(code.shape)} {code.dtype}")
    # stable, so that FP4's two zeros (index 0 and 8) keep their order: bitsandbytes' CPU quantizer sorts them so
    sorted_code, order = torch.sort(code, stable=True)
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return bounds, order
