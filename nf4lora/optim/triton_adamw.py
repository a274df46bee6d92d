"""Triton kernel of the multi-tensor AdamW step (`fused_adamw.adamw_update` dispatches here on CUDA).

Computes, for every segment of a launch, `fused_adamw`'s update (its docstring gives the arithmetic and the state
formats) and matches `adamw_update_reference` bit for bit: every operation rounds once (`div_rn`, `sqrt_rn`, FMA
contraction off) and the 8-bit requantization is `nf4lora.nf4.blockwise.quantize_blockwise`'s formula op for op,
through the same 65536-bin table. Tested under TRITON_INTERPRET=1 on the CPU and against the reference on a GPU.

One launch per (parameter dtype, gradient dtype, state kind) updates any number of tensors. Device tables hold
each segment's 5 state addresses (param, two moments or code arrays, two absmax arrays) and its row of step
scalars, and, apart, its gradient address; a program finds its segment by binary search over per-segment block
offsets, so the tables take a few KiB however large the parameters. A `Launch` keeps its tables on the device
from step to step and uploads only the gradient addresses when autograd moved the gradients. Interior tiles run
unmasked with 16-byte vector loads (when the host finds every address 16-byte aligned); a segment's last tile is
masked.

Bytes moved per element, float32 parameters and gradients: 32-bit states 4 + 4 (param) + 4 (grad) + 2 * 8
(moments) = 28; 8-bit states 12 + 2 * 2 (codes) + 16 / 256 (absmax) ~= 16.1.
"""

from __future__ import annotations

import functools
import operator

import torch
import triton
import triton.language as tl

from nf4lora.kernels.dispatch import on_device
from nf4lora.nf4 import blockwise as _blockwise
from nf4lora.nf4.codebook import dynamic_map
from nf4lora.optim.fused_adamw import QBLOCK, SCALARS, STATE_FIELDS_8, Segment

# Rows of 256 elements (one 8-bit block each) per program: 8 rows = 2048 elements, 8 warps, 8 elements a thread,
# the usual shape of a bandwidth-bound element-wise kernel; not yet tuned on hardware.
_ROWS = 8
_NUM_WARPS = 8
_ADDRESSES = 5  # param, exp_avg | state1, exp_avg_sq | state2, absmax1, absmax2 (gradients have their own table)


@triton.jit
def _adamw_tile(
    p_ptr, g_ptr, m_ptr, v_ptr, a1_ptr, a2_ptr,  # m/v: float32 moments, or uint8 codes with absmax a1/a2
    rows, n,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bias_correction2, eps,
    code1_ptr, lut1_ptr, code2_ptr, lut2_ptr,
    P_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, MASKED: tl.constexpr,
    QBLOCK: tl.constexpr, LUT_BINS: tl.constexpr,
):
    # rows: (ROWS,) 256-element block indices within the segment. MASKED only for the segment's last tile:
    # a mask that is not constant over 4 elements keeps the compiler from vectorizing the loads
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < n if MASKED else None
    zero = 0.0 if MASKED else None
    g = tl.load(g_ptr + offs, mask=mask, other=zero).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=zero).to(tl.float32)
    if EIGHT_BIT:
        row_mask = rows * QBLOCK < n if MASKED else None
        i1 = tl.load(m_ptr + offs, mask=mask, other=0 if MASKED else None).to(tl.int32)
        i2 = tl.load(v_ptr + offs, mask=mask, other=0 if MASKED else None).to(tl.int32)
        m = tl.load(code1_ptr + i1) * tl.load(a1_ptr + rows, mask=row_mask, other=zero)[:, None]
        v = tl.load(code2_ptr + i2) * tl.load(a2_ptr + rows, mask=row_mask, other=zero)[:, None]
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=zero)
        v = tl.load(v_ptr + offs, mask=mask, other=zero)

    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * one_minus_beta2) * g  # the reference's order (fused_adamw._moments_reference)
    denom = tl.sqrt_rn(v) * inv_bias_correction2 + eps
    p = p * decay - tl.math.div_rn(m, denom) * step_size
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

    if EIGHT_BIT:
        for which in tl.static_range(2):
            x = m if which == 0 else v
            if MASKED:
                x = tl.where(mask, x, 0.0)  # padding lanes must not raise the tail block's absmax
            lut_ptr = lut1_ptr if which == 0 else lut2_ptr
            idx_ptr = m_ptr if which == 0 else v_ptr
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


@triton.jit
def _adamw_kernel(
    # programs of segment s are block_starts[s] .. block_starts[s + 1] - 1, for s < segments
    block_starts_ptr, segments,
    # per segment tables
    address_ptr, grad_address_ptr, numel_ptr, scalar_row_ptr, scalars_ptr,
    # 8-bit lookup tables (signed then unsigned dynamic map)
    code1_ptr, lut1_ptr, code2_ptr, lut2_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr,
    ROWS: tl.constexpr, QBLOCK: tl.constexpr, LUT_BINS: tl.constexpr, ALIGN: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, ADDRESSES: tl.constexpr, SCALARS: tl.constexpr,
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
    base = address_ptr + seg * ADDRESSES
    # addresses come from a table, so the compiler cannot see their alignment; the host checked it (ALIGN)
    p_ptr = tl.multiple_of(tl.load(base).to(tl.pointer_type(P_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(grad_address_ptr + seg).to(tl.pointer_type(G_DTYPE)), ALIGN)
    state_dtype: tl.constexpr = tl.uint8 if EIGHT_BIT else tl.float32
    m_ptr = tl.multiple_of(tl.load(base + 1).to(tl.pointer_type(state_dtype)), ALIGN)
    v_ptr = tl.multiple_of(tl.load(base + 2).to(tl.pointer_type(state_dtype)), ALIGN)
    a1_ptr = tl.multiple_of(tl.load(base + 3).to(tl.pointer_type(tl.float32)), ALIGN)
    a2_ptr = tl.multiple_of(tl.load(base + 4).to(tl.pointer_type(tl.float32)), ALIGN)
    srow = scalars_ptr + tl.load(scalar_row_ptr + seg) * SCALARS
    rows = block * ROWS + tl.arange(0, ROWS)
    decay = tl.load(srow)
    beta1 = tl.load(srow + 1)
    one_minus_beta1 = tl.load(srow + 2)
    beta2 = tl.load(srow + 3)
    one_minus_beta2 = tl.load(srow + 4)
    step_size = tl.load(srow + 5)
    inv_bias_correction2 = tl.load(srow + 6)
    eps = tl.load(srow + 7)
    if (block + 1) * ROWS * QBLOCK <= n:
        _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, a1_ptr, a2_ptr, rows, n, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, step_size, inv_bias_correction2, eps, code1_ptr, lut1_ptr, code2_ptr, lut2_ptr,
                    P_DTYPE, EIGHT_BIT, False, QBLOCK, LUT_BINS)
    else:
        _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, a1_ptr, a2_ptr, rows, n, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, step_size, inv_bias_correction2, eps, code1_ptr, lut1_ptr, code2_ptr, lut2_ptr,
                    P_DTYPE, EIGHT_BIT, True, QBLOCK, LUT_BINS)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------


def _triton_dtype(dtype: torch.dtype):
    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in table:
        raise TypeError(f"the AdamW kernel takes float32, float16 or bfloat16 tensors, got {dtype}")
    return table[dtype]


@functools.lru_cache(maxsize=8)
def quant_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The signed and unsigned dynamic maps on `device` with their bin tables, for the kernel.

    Returns (code1, lut1, code2, lut2): code (256,) float32 and lut (65536,) uint8, the nearest-code table of
    `nf4lora.nf4.blockwise` (bin -> code index) for the signed (first moment) and unsigned (second moment) map.
    """
    tables = []
    for signed in (True, False):
        code = dynamic_map(signed)
        tables += [code.to(device), _blockwise.bin_table(code).to(torch.uint8).to(device)]
    return tuple(tables)


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


_SCALAR_TABLES: dict[torch.device, tuple[list[list[float]], torch.Tensor]] = {}


def scalar_table(scalars: list[list[float]], device: torch.device) -> torch.Tensor:
    """`scalars` (R rows of SCALARS) as a float32 tensor on `device`, uploaded once per step: a step's later
    launches (PagedAdamW's batches) find the same rows and reuse the upload."""
    cached = _SCALAR_TABLES.get(device)
    if cached is None or cached[0] != scalars:
        table = torch.tensor(scalars, dtype=torch.float32).to(device, non_blocking=True)
        cached = _SCALAR_TABLES[device] = ([list(row) for row in scalars], table)
    return cached[1]


class Launch:
    """One kernel launch over a fixed list of segments that share (param dtype, grad dtype, state kind).

    Built once, then called step after step: the state tables stay on the device, and `set_grads` uploads new
    gradient addresses when autograd moved the gradients.
    """

    def __init__(self, segments: list[Segment], grad_dtype: torch.dtype, grad_addresses: list[int]):
        first = segments[0]
        self.device = first.param.device
        self.eight_bit = first.eight_bit
        self.p_dtype, self.g_dtype = _triton_dtype(first.param.dtype), _triton_dtype(grad_dtype)
        self.count = len(segments)
        self.block_starts, self.numel, self.programs = _block_starts(tuple(seg.numel for seg in segments),
                                                                     self.device)
        names = STATE_FIELDS_8 if self.eight_bit else ("exp_avg", "exp_avg_sq", "exp_avg", "exp_avg")
        addresses = []
        for seg in segments:
            addresses.append(seg.param.data_ptr() + seg.start * seg.param.element_size())
            addresses += [seg.state[name].data_ptr() for name in names]
        rows = [seg.scalars for seg in segments]
        self.table = torch.tensor(addresses + rows, dtype=torch.int64).to(self.device, non_blocking=True)
        self.rows_table = self.table[_ADDRESSES * self.count:]
        self.quant_tables = quant_tables(self.device)
        self._low_bits = functools.reduce(operator.or_, addresses, 0)
        self.set_grads(grad_addresses)

    def set_grads(self, grad_addresses: list[int]) -> None:
        """Point the launch at new gradients: one byte address per segment, in build order."""
        self.grad_table = torch.tensor(grad_addresses, dtype=torch.int64).to(self.device, non_blocking=True)
        self.align = 16 if functools.reduce(operator.or_, grad_addresses, self._low_bits) & 15 == 0 else 1

    def __call__(self, scalars_table: torch.Tensor) -> None:
        """Update every segment in place with its row of `scalar_table`'s table."""
        if self.programs == 0:
            return
        with on_device(self.device):  # the segments may sit on another GPU than the current one
            _adamw_kernel[(self.programs,)](
                self.block_starts, self.count,
                self.table, self.grad_table, self.numel, self.rows_table, scalars_table,
                *self.quant_tables,
                P_DTYPE=self.p_dtype, G_DTYPE=self.g_dtype, EIGHT_BIT=self.eight_bit, ROWS=_ROWS, QBLOCK=QBLOCK,
                LUT_BINS=_blockwise.LUT_BINS, ALIGN=self.align, SEARCH_STEPS=max(self.count - 1, 1).bit_length(),
                ADDRESSES=_ADDRESSES, SCALARS=SCALARS, num_warps=_NUM_WARPS,
                enable_fp_fusion=False,  # no FMA contraction: every op rounds once, as in the reference
            )


def build_launches(segments: list[Segment], grads: list[torch.Tensor],
                   grad_addresses: list[int]) -> list[tuple[list[int], Launch]]:
    """One `Launch` per (param dtype, grad dtype, state kind) among `segments`, with the indices of its segments.

    grads[i], grad_addresses[i]: segment i's gradient tensor (for its dtype) and the address of its first element.
    """
    groups: dict[tuple, list[int]] = {}
    for i, (seg, grad) in enumerate(zip(segments, grads)):
        groups.setdefault((seg.param.dtype, grad.dtype, seg.eight_bit), []).append(i)
    return [(indices, Launch([segments[i] for i in indices], grads[indices[0]].dtype,
                             [grad_addresses[i] for i in indices])) for indices in groups.values()]


@torch.no_grad()
def adamw_update_triton(segments: list[Segment], scalars: list[list[float]]) -> None:
    """The Triton path of `adamw_update`: one launch per (param dtype, grad dtype, state kind) group."""
    if not segments:
        return
    table = scalar_table(scalars, segments[0].param.device)
    grads = [seg.grad for seg in segments]
    addresses = [g.data_ptr() + seg.start * g.element_size() for seg, g in zip(segments, grads)]
    for _, launch in build_launches(segments, grads, addresses):
        launch(table)
