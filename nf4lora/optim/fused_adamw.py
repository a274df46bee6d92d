"""The AdamW update of many tensors at once: a multi-tensor Triton kernel and its pure-PyTorch reference.

One call updates a list of `Segment`s, each a flat slice of one parameter with its gradient and optimizer state.
The optimizers build segments (a whole parameter for `AdamW`, a page for `PagedAdamW`) and this module applies
the same arithmetic to each, so where a segment's state lives never changes the numbers.

Shapes and dtypes of a segment covering n elements of a parameter:
- param: float32/float16/bfloat16, updated in place; grad: float32/float16/bfloat16; both contiguous.
- 32-bit state: `exp_avg`, `exp_avg_sq`: (n,) float32.
- 8-bit state: `state1`, `state2`: (n,) uint8 indices into bitsandbytes' signed / unsigned dynamic map
  (`nf4lora.nf4.codebook.dynamic_map`), `absmax1`, `absmax2`: (ceil(n/256),) float32, 256 elements per block,
  in exactly the format of `nf4lora.nf4.blockwise.quantize_blockwise` (its docstring defines the arithmetic).
  A segment of 8-bit state starts on a block boundary of its parameter.

Arithmetic (float32 throughout, scalars rounded to float32 once by `step_scalars`), for step t:
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    denom = sqrt(v) * (1 / sqrt(1 - beta2**t)) + eps
    p = p * (1 - lr * weight_decay) - (m / denom) * (lr / (1 - beta1**t))
This is torch.optim.AdamW's update with decoupled weight decay, written so that every operation rounds once:
single-rounding element-wise ops in the reference (no alpha= or addcdiv, which CPU kernels may fuse into an FMA
on their vector path but not on their scalar tail; the square root taken in float64 and rounded once, because
torch's float32 sqrt is not correctly rounded on every CPU), and in the kernel `div_rn`, `sqrt_rn` and FMA
contraction switched off. So an element's result never depends on how its tensor was cut into segments, which is
what makes `PagedAdamW` bit-identical to `AdamW`, and the kernel matches the reference bit for bit (tested under
TRITON_INTERPRET=1); the 8-bit requantization is `quantize_blockwise`'s formula op for op.

Bytes moved per element: 32-bit states 4*2 (param) + 4 (grad) + 8*2 (moments) = 28 for float32 parameters;
8-bit states 12 + 2*2 (+ 16/256 for absmax).

The kernel takes one launch per (parameter dtype, gradient dtype, state kind) for any number of tensors: device
tables hold each segment's addresses and step scalars, and a program finds its segment by binary search over
cached per-segment block offsets. Dispatch follows `nf4lora.kernels.dispatch` (`NF4LORA_KERNELS`, `use_kernels`).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import torch

from nf4lora.kernels.dispatch import use_triton
from nf4lora.nf4 import blockwise as _blockwise
from nf4lora.nf4.blockwise import dequantize_blockwise, quantize_blockwise
from nf4lora.nf4.codebook import dynamic_map

QBLOCK = 256  # elements per absmax block of 8-bit optimizer states, as in bitsandbytes' blockwise optimizers
STATE_FIELDS_32 = ("exp_avg", "exp_avg_sq")
STATE_FIELDS_8 = ("state1", "state2", "absmax1", "absmax2")
_SCALARS = 8  # decay, beta1, 1 - beta1, beta2, 1 - beta2, step_size, 1 / sqrt(bias_correction2), eps


@dataclass
class Segment:
    """Elements [start, start + numel) of one parameter and their state; the update writes them in place.

    param, grad: contiguous tensors of the same numel (any shape, float dtypes); state: (numel,)-element
    `STATE_FIELDS_32` or `STATE_FIELDS_8` tensors (module docstring); scalars: this segment's row in the table
    passed to `adamw_update`. Segments carry whole tensors and offsets so the kernel path needs no views; the
    optimizers keep one per parameter or page and only swap `grad` and `scalars` between steps.
    """

    param: torch.Tensor
    grad: torch.Tensor | None
    start: int
    numel: int
    state: dict[str, torch.Tensor]
    scalars: int = 0
    state_addresses: list[int] | None = field(default=None, repr=False)  # filled by the kernel path

    @property
    def eight_bit(self) -> bool:
        return "state1" in self.state


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> list[float]:
    """The per-step constants of the update, computed in float64 and rounded to float32 once (both paths use them)."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    values = [1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / bias_correction1,
              1.0 / math.sqrt(bias_correction2), eps]
    return torch.tensor(values, dtype=torch.float32).tolist()


@functools.lru_cache(maxsize=8)
def quant_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The signed and unsigned dynamic maps on `device` with their bin tables, for the kernel.

    Returns (code1, lut1, code2, lut2): code (256,) float32 and lut (65536,) uint8, the nearest-code table of
    `nf4lora.nf4.blockwise` (bin -> code index) for the signed (first moment) and unsigned (second moment) map.
    """
    tables = []
    for signed in (True, False):
        code = dynamic_map(signed)
        tables += [code.to(device), _blockwise._bin_table(code).to(torch.uint8).to(device)]
    return tuple(tables)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def _moments_reference(seg: Segment, s: list[float]) -> None:
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bias_correction2, eps = s
    if seg.eight_bit:
        code1, code2 = dynamic_map(True), dynamic_map(False)
        m = dequantize_blockwise(seg.state["state1"], seg.state["absmax1"], code1, QBLOCK, torch.float32)
        v = dequantize_blockwise(seg.state["state2"], seg.state["absmax2"], code2, QBLOCK, torch.float32)
    else:
        m, v = seg.state["exp_avg"], seg.state["exp_avg_sq"]
    end = seg.start + seg.numel
    param = seg.param.view(-1)[seg.start:end]
    g = seg.grad.view(-1)[seg.start:end].float()
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    # torch.sqrt is not correctly rounded for float32 on every CPU; a float64 root rounded once is
    denom = torch.sqrt(v.double()).float() * inv_bias_correction2 + eps
    param.copy_(param.float() * decay - (m / denom) * step_size)
    if seg.eight_bit:
        for name, value, code in (("1", m, code1), ("2", v, code2)):
            indices, absmax = quantize_blockwise(value, code, QBLOCK)
            seg.state["state" + name].copy_(indices)
            seg.state["absmax" + name].copy_(absmax)
    else:
        seg.state["exp_avg"].copy_(m)
        seg.state["exp_avg_sq"].copy_(v)


@torch.no_grad()
def adamw_update_reference(segments: list[Segment], scalars: list[list[float]]) -> None:
    """Pure-PyTorch AdamW update of every segment, one at a time (any device); `scalars` rows from `step_scalars`."""
    for seg in segments:
        _moments_reference(seg, scalars[seg.scalars])


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

# Rows of 256 elements (one 8-bit block each) per program: 8 rows = 2048 elements, 8 warps, 8 elements a thread,
# the usual shape of a bandwidth-bound element-wise kernel; not yet tuned on hardware.
_ROWS = 8
_NUM_WARPS = 8
_ADDRESSES = 6  # param, grad, exp_avg | state1, exp_avg_sq | state2, absmax1, absmax2


@functools.cache
def _kernel():
    # Built on first use: importing triton and decorating costs time that CPU-only users should not pay.
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_kernel(
        # programs of segment s are block_starts[s] .. block_starts[s + 1] - 1, for s < segments
        block_starts_ptr, segments,
        # per segment tables
        address_ptr, numel_ptr, scalar_row_ptr, scalars_ptr,
        # 8-bit lookup tables (signed then unsigned dynamic map)
        code1_ptr, lut1_ptr, code2_ptr, lut2_ptr,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr,
        ROWS: tl.constexpr, QBLOCK: tl.constexpr, LUT_BINS: tl.constexpr, ALIGN: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # binary search for this program's segment: the last s with block_starts[s] <= pid
        lo = 0
        hi = segments
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            take = tl.load(block_starts_ptr + mid) <= pid
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        seg = lo
        block = (pid - tl.load(block_starts_ptr + seg)).to(tl.int64)
        n = tl.load(numel_ptr + seg)
        base = address_ptr + seg * 6
        # addresses come from a table, so the compiler cannot see their alignment; the host checked it (ALIGN)
        p_ptr = tl.multiple_of(tl.load(base).to(tl.pointer_type(P_DTYPE)), ALIGN)
        g_ptr = tl.multiple_of(tl.load(base + 1).to(tl.pointer_type(G_DTYPE)), ALIGN)
        srow = scalars_ptr + tl.load(scalar_row_ptr + seg) * 8
        decay = tl.load(srow)
        beta1 = tl.load(srow + 1)
        one_minus_beta1 = tl.load(srow + 2)
        beta2 = tl.load(srow + 3)
        one_minus_beta2 = tl.load(srow + 4)
        step_size = tl.load(srow + 5)
        inv_bias_correction2 = tl.load(srow + 6)
        eps = tl.load(srow + 7)

        rows = block * ROWS + tl.arange(0, ROWS)  # 256-element block indices within the segment
        offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if EIGHT_BIT:
            s1_ptr = tl.multiple_of(tl.load(base + 2).to(tl.pointer_type(tl.uint8)), ALIGN)
            s2_ptr = tl.multiple_of(tl.load(base + 3).to(tl.pointer_type(tl.uint8)), ALIGN)
            a1_ptr = tl.multiple_of(tl.load(base + 4).to(tl.pointer_type(tl.float32)), ALIGN)
            a2_ptr = tl.multiple_of(tl.load(base + 5).to(tl.pointer_type(tl.float32)), ALIGN)
            row_mask = rows * QBLOCK < n
            i1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
            i2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
            absmax1 = tl.load(a1_ptr + rows, mask=row_mask, other=0.0)
            absmax2 = tl.load(a2_ptr + rows, mask=row_mask, other=0.0)
            m = tl.load(code1_ptr + i1) * absmax1[:, None]
            v = tl.load(code2_ptr + i2) * absmax2[:, None]
        else:
            m_ptr = tl.multiple_of(tl.load(base + 2).to(tl.pointer_type(tl.float32)), ALIGN)
            v_ptr = tl.multiple_of(tl.load(base + 3).to(tl.pointer_type(tl.float32)), ALIGN)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)

        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        denom = tl.sqrt_rn(v) * inv_bias_correction2 + eps
        p = p * decay - tl.math.div_rn(m, denom) * step_size
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

        if EIGHT_BIT:
            for which in tl.static_range(2):
                x = tl.where(mask, m if which == 0 else v, 0.0)
                lut_ptr = lut1_ptr if which == 0 else lut2_ptr
                idx_ptr = s1_ptr if which == 0 else s2_ptr
                amax_ptr = a1_ptr if which == 0 else a2_ptr
                # quantize_blockwise's 8-bit formula, op for op
                absmax = tl.max(tl.abs(x), axis=1)
                nonzero = absmax > 0  # an all-zero block stores absmax 0 and index 0
                reciprocal = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(nonzero, absmax, 1.0))
                scaled = x * reciprocal[:, None]
                scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
                bins = ((scaled + 1.0) * 0.5 * (LUT_BINS - 1.0) + 0.5).to(tl.int32)
                bins = tl.minimum(tl.maximum(bins, 0), LUT_BINS - 1)
                index = tl.where(nonzero[:, None], tl.load(lut_ptr + bins), 0)
                tl.store(idx_ptr + offs, index.to(tl.uint8), mask=mask)
                tl.store(amax_ptr + rows, absmax, mask=row_mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)

    return _adamw_kernel


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in table:
        raise TypeError(f"the AdamW kernel takes float32, float16 or bfloat16 tensors, got {dtype}")
    return table[dtype]


@functools.lru_cache(maxsize=64)
def _block_starts(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(block_starts (S+1,) int32, numel (S,) int64) on `device`, and the program count, for segments of `numels`.

    O(segments) memory, not O(programs): the kernel finds its segment by binary search, so the tables stay a few
    KiB however large the parameters are.
    """
    elements = _ROWS * QBLOCK
    blocks = [-(-n // elements) for n in numels]
    starts = [0]
    for count in blocks:
        starts.append(starts[-1] + count)
    if starts[-1] >= 2**31:
        raise ValueError(f"{starts[-1]} programs exceed the kernel's int32 program ids; split the parameter list")
    block_starts = torch.tensor(starts, dtype=torch.int32).to(device)
    return block_starts, torch.tensor(numels, dtype=torch.int64).to(device), starts[-1]


# The last address table uploaded per (device, state kind, segment count), reused while a step's addresses are
# unchanged (the usual case: gradients come back at the same addresses), so a step costs one small upload of
# scalars. The count keeps PagedAdamW's one-page launches from displacing the table of its resident pages.
_TABLES: dict[tuple[torch.device, bool, int], tuple[list[int], torch.Tensor, int]] = {}
_SCALAR_TABLES: dict[torch.device, tuple[list[list[float]], torch.Tensor]] = {}


def _address_table(segments: list[Segment], eight_bit: bool) -> tuple[torch.Tensor, int, int]:
    """(table (7S,) int64 on the device: 6 addresses per segment then the scalar rows, alignment, S)."""
    addresses, rows = [], []
    names = STATE_FIELDS_8 if eight_bit else ("exp_avg", "exp_avg_sq", "exp_avg", "exp_avg")
    for seg in segments:
        if seg.state_addresses is None:
            seg.state_addresses = [seg.state[name].data_ptr() for name in names]
        addresses.append(seg.param.data_ptr() + seg.start * seg.param.element_size())
        addresses.append(seg.grad.data_ptr() + seg.start * seg.grad.element_size())
        addresses += seg.state_addresses
        rows.append(seg.scalars)
    addresses += rows
    key = (segments[0].param.device, eight_bit, len(segments))
    cached = _TABLES.get(key)
    if cached is None or cached[0] != addresses:
        table = torch.tensor(addresses, dtype=torch.int64).to(key[0], non_blocking=True)
        low_bits = functools.reduce(operator.or_, addresses[:-len(rows)], 0) & 15
        cached = _TABLES[key] = (addresses, table, 16 if low_bits == 0 else 1)
    return cached[1], cached[2], len(rows)


def _launch(segments: list[Segment], scalars_table: torch.Tensor, eight_bit: bool) -> None:
    device = segments[0].param.device
    block_starts, numel, programs = _block_starts(tuple(seg.numel for seg in segments), device)
    if programs == 0:
        return
    table, align, count = _address_table(segments, eight_bit)
    _kernel()[(programs,)](
        block_starts, count,
        table, numel, table[_ADDRESSES * count:], scalars_table,
        *quant_tables(device),
        P_DTYPE=_triton_dtype(segments[0].param.dtype), G_DTYPE=_triton_dtype(segments[0].grad.dtype),
        EIGHT_BIT=eight_bit, ROWS=_ROWS, QBLOCK=QBLOCK, LUT_BINS=_blockwise._LUT_BINS, ALIGN=align,
        SEARCH_STEPS=max(count - 1, 1).bit_length(), num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # no FMA contraction: every op rounds once, as in the reference
    )


@torch.no_grad()
def adamw_update_triton(segments: list[Segment], scalars: list[list[float]]) -> None:
    """The Triton path of `adamw_update`: one launch per (param dtype, grad dtype, state kind) group."""
    if not segments:
        return
    device = segments[0].param.device
    cached = _SCALAR_TABLES.get(device)
    if cached is None or cached[0] != scalars:  # once per step: PagedAdamW's batches reuse the step's table
        table = torch.tensor(scalars, dtype=torch.float32).reshape(-1, _SCALARS).to(device, non_blocking=True)
        cached = _SCALAR_TABLES[device] = ([list(row) for row in scalars], table)
    scalars_table = cached[1]
    groups: dict[tuple, list[Segment]] = {}
    for seg in segments:
        groups.setdefault((seg.param.dtype, seg.grad.dtype, seg.eight_bit), []).append(seg)
    for (_, _, eight_bit), group in groups.items():
        _launch(group, scalars_table, eight_bit)


def adamw_update(segments: list[Segment], scalars: list[list[float]]) -> None:
    """Apply one AdamW step to every segment (same device), Triton or reference per `nf4lora.kernels.dispatch`."""
    if segments and use_triton(segments[0].param.device):
        adamw_update_triton(segments, scalars)
    else:
        adamw_update_reference(segments, scalars)
