"""`QuantizedTensor`: a 4-bit blockwise-quantized weight and its `QuantState`, in bitsandbytes' format.

Bytes per parameter: 0.5 for the packed codes, plus 4 / blocksize for a float32 absmax, or with double quantization
1 / blocksize (uint8 absmax) + 4 / (256 * blocksize) (nested absmax) + the codebooks. At blocksize 64 that is
4.5 bits per parameter without double quantization and about 4.127 with it (`QuantizedTensor.bits_per_param`).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch

from .blockwise import (
    FLOAT_DTYPES, check_float_input, dequantize_blockwise, num_blocks, quantize_packed, unpack_nibbles,
)
from .codebook import BLOCKSIZES, NESTED_BLOCKSIZE, resolve_code
from .double_quant import compress_absmax, decompress_absmax


@dataclasses.dataclass
class QuantState:
    """Everything needed to decode a `QuantizedTensor`'s packed codes.

    absmax: (nblocks,) float32, or (nblocks,) uint8 indices into `nested_code` when double-quantized.
    shape, dtype: the original tensor's shape and dtype (the default dequantize dtype).
    blocksize: elements per absmax block; quant_type: "nf4", "fp4" or "custom"; code: (16,) float32 codebook.
    offset: 0-d float32; nested_absmax: (ceil(nblocks/256),) float32; nested_code: (256,) float32;
    nested_blocksize: 256. These four are set only when double-quantized.
    The Triton quantizer gives every weight the same cached codebook tensors: treat `code` and `nested_code` as
    read-only (`to_bnb_state_dict` exports copies).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_float32(self) -> torch.Tensor:
        """(nblocks,) float32 absmax, decoding the 8-bit form when double-quantized."""
        if not self.double_quant:
            return self.absmax
        return decompress_absmax(self.absmax, self.offset, self.nested_absmax, self.nested_code, self.nested_blocksize)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (absent nested fields left out)."""
        names = ("absmax", "code", "offset", "nested_absmax", "nested_code")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(self, device: torch.device | str | int) -> QuantState:
        """This state on `device`; the stored dtypes never change (a cast would corrupt the uint8 absmax)."""
        device = check_device(device)
        return dataclasses.replace(self, **{name: t.to(device) for name, t in self.tensors().items()})


def check_device(device: torch.device | str | int) -> torch.device:
    """``device`` as a torch.device, or a one-line TypeError: a quantized tensor moves between devices but never
    changes dtype (dequantize(dtype) chooses the output dtype)."""
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(
            f"a quantized tensor moves to a device only, got {device!r}; valid: a torch.device, a device string "
            f"such as 'cpu' or 'cuda:0', or a CUDA index (use .dequantize(dtype) for another dtype)"
        )
    return torch.device(device)


def check_decodes_finite(state: QuantState, what: str, valid: str) -> None:
    """Raise unless every value `state` decodes to is finite in `state.dtype`.

    A decoded value is `code[idx] * absmax` in float32 rounded to `dtype`, so max|code| * max|absmax| bounds them
    all, and NF4 and FP4 reach the bound (each block's largest element takes a code of magnitude 1). A
    double-quantized absmax decodes up to about 0.7% above the true one (double_quant.py's bound), so a float16
    weight near 65504 can decode to Inf; bitsandbytes decodes such a state to the same Inf.
    """
    largest = state.absmax_float32().abs().max() * state.code.abs().max()
    if not bool(torch.isfinite(largest.to(state.dtype))):
        dtype = str(state.dtype).removeprefix("torch.")
        raise ValueError(f"{what} decodes to values up to {float(largest):.6g}, which overflow {dtype}; valid: {valid}")


def check_double_quant_decodes_finite(state: QuantState, mean: float, code_max: float) -> None:
    """`check_decodes_finite` for a weight just double-quantized (by the reference or the Triton quantizer), whose
    offset (the mean block absmax) is `mean` and whose codebook's max |code| is `code_max`.

    A decoded absmax is at most |offset| + max|absmax - offset| <= 2 max(absmax) <= 2 n mean over the n blocks, so
    only a weight whose bound reaches its dtype's largest value needs the exact check (a decode of the absmax, and on
    a GPU one more wait); 2.1 covers the float32 rounding of the mean. For bf16 and float32 (and NF4's max |code|
    of 1) that takes a mean block absmax above about 1.6e38 / n.
    """
    if 2.1 * state.absmax.numel() * abs(mean) * code_max < torch.finfo(state.dtype).max:
        return
    dtype = str(state.dtype).removeprefix("torch.")
    valid = f"weights about 1% below {dtype}'s largest finite value, or double_quant=False"
    check_decodes_finite(state, "the double-quantized weight", valid)


def check_blocksize(blocksize: int) -> int:
    """``blocksize`` as a Python int (a NumPy integer would not serialize to the state dict's JSON), or a
    ValueError naming the valid ones."""
    if type(blocksize) is int and blocksize in BLOCKSIZES:  # the usual case, without the ABC check's cost
        return blocksize
    # 64.0 == 64, so membership alone would let a float through
    if not isinstance(blocksize, numbers.Integral) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not supported; valid: powers of two {', '.join(map(str, BLOCKSIZES))}")
    return int(blocksize)


def check_double_quant(double_quant: object) -> bool:
    """``double_quant`` as a Python bool (NumPy's bool accepted), or a one-line TypeError naming it: ``bool("no")``
    is True, so a string or a number would silently switch double quantization on."""
    if not isinstance(double_quant, (bool, np.bool_)):
        raise TypeError(f"double_quant={double_quant!r} ({type(double_quant).__name__}) is not a bool; valid: True, "
                        f"False")
    return bool(double_quant)


class QuantizedTensor:
    """A tensor stored as packed 4-bit codes plus a `QuantState`.

    packed: (ceil(numel / 2),) uint8, two codes per byte (codebook.py's note gives the nibble order).
    """

    def __init__(self, packed: torch.Tensor, state: QuantState):
        if not isinstance(packed, torch.Tensor) or not isinstance(state, QuantState):
            got = f"{type(packed).__name__} and {type(state).__name__}"
            raise TypeError(f"QuantizedTensor needs a uint8 torch.Tensor of packed codes and a QuantState, got {got}")
        numel = state.shape.numel()
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 2):
            raise ValueError(
                f"packed codes must be ({-(-numel // 2)},) uint8 for shape {tuple(state.shape)}, "
                f"got {tuple(packed.shape)} {packed.dtype}"
            )
        expected_blocks = num_blocks(numel, state.blocksize)
        if state.absmax.shape != (expected_blocks,):
            raise ValueError(
                f"absmax must have {expected_blocks} entries for {numel} elements at blocksize {state.blocksize}, "
                f"got shape {tuple(state.absmax.shape)}"
            )
        self.packed = packed
        self.state = state

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.state.shape.numel()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes, absmax, and the double-quantization state (codebooks included)."""
        return self.packed.numel() + sum(t.numel() * t.element_size() for t in self.state.tensors().values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor, shape `self.shape`, in `dtype` (default: the original dtype)."""
        return dequantize(self, dtype)

    def to(self, device: torch.device | str | int) -> QuantizedTensor:
        """This tensor on `device` (packed codes and state); `QuantState.to` says what is refused."""
        state = self.state.to(device)
        return QuantizedTensor(self.packed.to(state.absmax.device), state)

    def __repr__(self) -> str:
        kind = f"{self.state.quant_type}{'+dq' if self.state.double_quant else ''}"
        return f"QuantizedTensor(shape={tuple(self.shape)}, {kind}, blocksize={self.state.blocksize}, device={self.device})"


def quantize(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    code: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize `w` blockwise to 4 bits, as bitsandbytes' `quantize_4bit` does on the CPU.

    Args:
        w: any shape, float32/float16/bfloat16, finite, non-empty.
        blocksize: a power of two from 32 to 4096.
        quant_type: "nf4" or "fp4"; ignored when `code` is given.
        double_quant: also quantize the absmax to 8 bits (QLoRA's double quantization).
        code: optional custom (16,) float32 codebook in [-1, 1]; its quant_type is recorded as "custom".
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES or w.numel() == 0:
        check_float_input(w, "weight")
    blocksize = check_blocksize(blocksize)
    double_quant = check_double_quant(double_quant)
    w = w.detach()  # quantizing a Parameter must keep no autograd graph (nor its float copy of w) alive
    code, quant_type = resolve_code(quant_type, code)
    code = code.to(w.device)
    packed, absmax = quantize_packed(w.reshape(-1), code, blocksize)
    # a NaN or an infinity makes its block's absmax non-finite: a check of n / blocksize values, not of w
    if not bool(torch.isfinite(absmax).all()):
        check_float_input(w, "weight")  # raises, counting them
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type, code=code)
    if double_quant:
        quantized, offset, nested_absmax, nested_code = compress_absmax(absmax)
        state = dataclasses.replace(
            state,
            absmax=quantized,
            offset=offset,
            nested_absmax=nested_absmax,
            nested_code=nested_code,
            nested_blocksize=NESTED_BLOCKSIZE,
        )
        check_double_quant_decodes_finite(state, float(offset), float(code.abs().max()))
    return QuantizedTensor(packed, state)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode `q` to a dense tensor of shape `q.shape` in `dtype` (default `q.dtype`).

    Values are `code[idx] * absmax[block]` computed in float32 and rounded once to `dtype`, bit-exact with
    bitsandbytes' `dequantize_4bit` on the CPU.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize needs a QuantizedTensor, got {type(q).__name__}; valid: the result of quantize()")
    dtype = dtype or q.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cannot dequantize to {dtype}; valid: float32, float16, bfloat16")
    state = q.state
    indices = unpack_nibbles(q.packed, q.numel())
    return dequantize_blockwise(indices, state.absmax_float32(), state.code, state.blocksize, dtype).view(q.shape)

