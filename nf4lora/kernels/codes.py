"""Triton device helpers that read packed 4-bit codes and their absmax; shared by the kernels.

Packed weights are read as 32-bit words of 8 codes. Byte p of a little-endian word holds elements
2p (high nibble) and 2p + 1 (low nibble), so element j of a word sits at bit ``word_shifts()[j]``,
8 (j // 2) + 4 (1 - j % 2).

The 16-entry lookup is the hot instruction of every kernel here. Two ways, both for any 16-value codebook:

- float32 codes (``lookup``, ``dequantize_words``): compiled (``PTX``), each thread keeps
  ``code[lane % 16]`` in one register (``lane_code``) and a lookup is one warp shuffle whose source
  lane is the word shifted right: ``shfl`` reads only the low 5 bits of the lane, and lanes 16-31
  hold copies of lanes 0-15, so the nibble needs no mask. That replaces a 64-bit address computation
  and an L1 gather per element.
- 16-bit codes (``code_tables``, ``word_codes``): the codes rounded to fp16 or bf16 are split into a
  table of their low bytes and one of their high bytes, four codes per 32-bit register, and byte
  permutes (``prmt``) pick four codes' bytes at once: 21 integer instructions for a word's 8 codes and
  no shuffle. Shuffles go through the same load/store pipe as the tensor-core kernel's shared memory
  traffic, which they crowded; byte permutes run on the integer units.

The interpreter, which has no inline PTX, gathers from ``state.code`` instead.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_rn(a, b, PTX: tl.constexpr):
    """a + b rounded on its own: an inline ``add.rn`` cannot be fused with the product feeding it."""
    if PTX:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    return a + b


@triton.jit
def load_absmax(
    absmax_ptr, nested_absmax_ptr, blocks, mask, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr
):
    """The stored absmax of quantization blocks ``blocks`` and, with double quantization, their nested absmax.

    Split from ``decode_absmax`` so that a kernel can issue these loads a step ahead of their use.
    """
    if DOUBLE_QUANT:
        stored = tl.load(absmax_ptr + blocks, mask=mask, other=0)
        nested = tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
    else:
        stored = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
        nested = stored.to(tl.float32)  # unused; typed as the other branch's (triton 3.6 checks both)
    return stored, nested


@triton.jit
def decode_loaded_absmax(stored, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr):
    """float32 absmax from ``load_absmax``'s values: ``nested_code[stored] * nested + offset`` or ``stored``.

    The nested decode rounds the product before adding the offset, as the reference does; ``PTX``
    (compiled, not interpreted) makes that hold even where the kernel is compiled with fp fusion on.
    """
    if DOUBLE_QUANT:
        scale = _add_rn(tl.load(nested_code_ptr + stored.to(tl.int32)) * nested, tl.load(offset_ptr), PTX)
    else:
        scale = stored.to(tl.float32)
    return scale


@triton.jit
def decode_absmax(
    absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, blocks, mask,
    NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PTX: tl.constexpr,
):
    """float32 absmax of quantization blocks ``blocks`` (any shape of int indices); 0 where ``mask`` is off."""
    stored, nested = load_absmax(absmax_ptr, nested_absmax_ptr, blocks, mask, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return decode_loaded_absmax(stored, nested, nested_code_ptr, offset_ptr, DOUBLE_QUANT, PTX)


@triton.jit
def lane_code(code_ptr, PTX: tl.constexpr, ENTRIES: tl.constexpr = 16):
    """``code[laneid % ENTRIES]``, a scalar: each thread's own entry of a 16- or 32-entry table (compiled; 0 under
    the interpreter).

    A scalar, not a tensor, on purpose: a tensor of lane-dependent values would be wrong after any
    layout conversion that moves elements between lanes, while a scalar is broadcast in place.
    """
    if PTX:
        lane = tl.inline_asm_elementwise(
            "mov.u32 $0, %laneid;", "=r,r", [tl.program_id(0)], dtype=tl.int32, is_pure=True, pack=1
        )
        return tl.load(code_ptr + (lane & (ENTRIES - 1)))
    return 0.0


@triton.jit
def word_shifts():
    """(8,) int32: the bit at which element j of a packed 32-bit word starts."""
    j = tl.arange(0, 8)
    return 8 * (j >> 1) + 4 - 4 * (j & 1)


@triton.jit
def lookup(lane_codes, code_ptr, idx, PTX: tl.constexpr, ENTRIES: tl.constexpr = 16):
    """float32 ``code[idx % ENTRIES]`` for int32 ``idx`` and ``lane_codes = lane_code(code_ptr, PTX, ENTRIES)``;
    the bits above the low 4 (or 5) are ignored."""
    if PTX:
        return tl.inline_asm_elementwise(
            "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r", [lane_codes, idx],
            dtype=tl.float32, is_pure=True, pack=1,
        )
    return tl.load(code_ptr + (idx & (ENTRIES - 1)))


@triton.jit
def dequantize_words(words, scale, lane_codes, code_ptr, dtype: tl.constexpr, PTX: tl.constexpr):
    """(R, W) int32 words and (R, 1) float32 scales -> (R, 8 W) ``code * scale`` rounded once to ``dtype``.

    Element 8c + j of a row is code j of word c. The products are plain float32 multiplies, as in the
    reference, so the result is bit-exact.
    """
    v0 = (lookup(lane_codes, code_ptr, words >> 4, PTX) * scale).to(dtype)
    v1 = (lookup(lane_codes, code_ptr, words, PTX) * scale).to(dtype)
    v2 = (lookup(lane_codes, code_ptr, words >> 12, PTX) * scale).to(dtype)
    v3 = (lookup(lane_codes, code_ptr, words >> 8, PTX) * scale).to(dtype)
    v4 = (lookup(lane_codes, code_ptr, words >> 20, PTX) * scale).to(dtype)
    v5 = (lookup(lane_codes, code_ptr, words >> 16, PTX) * scale).to(dtype)
    v6 = (lookup(lane_codes, code_ptr, words >> 28, PTX) * scale).to(dtype)
    v7 = (lookup(lane_codes, code_ptr, words >> 24, PTX) * scale).to(dtype)
    return _interleave(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _interleave(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight (R, W) tensors, element j of every word in ``vj`` -> (R, 8 W), element 8c + j from ``vj[:, c]``."""
    # each join adds an innermost axis: the inner joins split on j >> 2, the outer one on j & 1, so
    # the reshape lists j in order
    even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(even, odd), [v0.shape[0], v0.shape[1] * 8])


@triton.jit
def _byte_tables(code_ptr, first: tl.constexpr, dtype: tl.constexpr):
    """Codes first..first+3 rounded to 16-bit ``dtype``: their low bytes packed into one int32, and their high bytes."""
    c0 = tl.load(code_ptr + first).to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    c1 = tl.load(code_ptr + first + 1).to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    c2 = tl.load(code_ptr + first + 2).to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    c3 = tl.load(code_ptr + first + 3).to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    low = (c0 & 255) | ((c1 & 255) << 8) | ((c2 & 255) << 16) | ((c3 & 255) << 24)
    high = (c0 >> 8) | ((c1 >> 8) << 8) | ((c2 >> 8) << 16) | ((c3 >> 8) << 24)
    return low, high


@triton.jit
def code_tables(code_ptr, dtype: tl.constexpr):
    """The 16 codes rounded to 16-bit ``dtype`` as ``word_codes``' 8 int32 scalar tables: the low bytes of codes
    0-3, 4-7, 8-11 and 12-15 (code 4t + i in byte i of table t), then their high bytes in the same order."""
    l0, h0 = _byte_tables(code_ptr, 0, dtype)
    l1, h1 = _byte_tables(code_ptr, 4, dtype)
    l2, h2 = _byte_tables(code_ptr, 8, dtype)
    l3, h3 = _byte_tables(code_ptr, 12, dtype)
    return l0, l1, l2, l3, h0, h1, h2, h3


# $8: the word; $9-$12 / $13-$16: low / high byte tables. For four codes at a time (the low, then the high
# half of the word) each 4-bit index picks its byte from tables 0-1 and from tables 2-3 with its low 3 bits
# (masked: prmt's 4th selector bit would replicate the byte's sign instead), and a third prmt keeps one of
# the two by the index's 4th bit (moved to the selector's bit 2). A last prmt pairs each code's low and
# high byte: element 2p + 1 sits in the low nibble of byte p, element 2p in the high one.
def _four_codes_ptx(first_output: int) -> str:
    """PTX for four codes from selectors s / m: outputs $first_output..$first_output+3 (16-bit)."""
    return f"""prmt.b32 a, $9, $10, s;
prmt.b32 b, $11, $12, s;
prmt.b32 lo, a, b, m;
prmt.b32 a, $13, $14, s;
prmt.b32 b, $15, $16, s;
prmt.b32 hi, a, b, m;
prmt.b32 p, lo, hi, 0x4051;
mov.b32 {{${first_output}, ${first_output + 1}}}, p;
prmt.b32 p, lo, hi, 0x6273;
mov.b32 {{${first_output + 2}, ${first_output + 3}}}, p;
"""


_WORD_CODES_PTX = tl.constexpr(
    """
{
.reg .b32 s, m, a, b, lo, hi, p;
and.b32 s, $8, 0x77777777;
shr.u32 m, $8, 1;
and.b32 m, m, 0x44444444;
or.b32 m, m, 0x32103210;
"""
    + _four_codes_ptx(0)
    + """shr.u32 s, s, 16;
shr.u32 m, m, 16;
"""
    + _four_codes_ptx(4)
    + "}\n"
)


@triton.jit
def word_codes(words, l0, l1, l2, l3, h0, h1, h2, h3, code_ptr, dtype: tl.constexpr, PTX: tl.constexpr):
    """(R, W) int32 words -> (R, 8 W) unscaled codes rounded to 16-bit ``dtype``, element 8c + j = code j of word c.

    ``l0``..``h3`` are ``code_tables(code_ptr, dtype)``, built once per program.
    """
    if PTX:
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _WORD_CODES_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
            [words, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.int16,) * 8, is_pure=True, pack=1,
        )
        codes = _interleave(v0, v1, v2, v3, v4, v5, v6, v7).to(dtype, bitcast=True)
    else:
        codes = _interleave(
            tl.load(code_ptr + ((words >> 4) & 15)).to(dtype), tl.load(code_ptr + (words & 15)).to(dtype),
            tl.load(code_ptr + ((words >> 12) & 15)).to(dtype), tl.load(code_ptr + ((words >> 8) & 15)).to(dtype),
            tl.load(code_ptr + ((words >> 20) & 15)).to(dtype), tl.load(code_ptr + ((words >> 16) & 15)).to(dtype),
            tl.load(code_ptr + ((words >> 28) & 15)).to(dtype), tl.load(code_ptr + ((words >> 24) & 15)).to(dtype),
        )
    return codes
