"""The AdamW update of many tensors at once: its arithmetic, state formats, pure-PyTorch reference and dispatch.

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
    v = v * beta2 + (g * (1 - beta2)) * g
    denom = sqrt(v) * (1 / sqrt(1 - beta2**t)) + eps
    p = p * (1 - lr * weight_decay) - (m / denom) * (lr / (1 - beta1**t))
This is torch.optim.AdamW's update with decoupled weight decay, written so that every operation rounds once:
single-rounding element-wise ops in the reference (no alpha= or addcdiv, which CPU kernels may fuse into an FMA
on their vector path but not on their scalar tail; the square root taken in float64 and rounded once, because
torch's float32 sqrt is not correctly rounded on every CPU), and in the kernel `div_rn`, `sqrt_rn` and FMA
contraction switched off. So an element's result never depends on how its tensor was cut into segments, which is
what makes `PagedAdamW` bit-identical to `AdamW`, and the kernel matches the reference bit for bit (tested under
TRITON_INTERPRET=1, and on a GPU by the gpu-marked tests); the 8-bit requantization is `quantize_blockwise`'s
formula op for op. The kernel's PTX (Triton 3.6 and 3.9, sm_90) has no FMA and no flush-to-zero instruction.

The Triton kernel (`triton_adamw.py`, imported only when it runs) takes one launch per (parameter dtype, gradient
dtype, state kind) for any number of tensors. Dispatch follows `nf4lora.kernels.dispatch` (`NF4LORA_KERNELS`,
`use_kernels`): Triton on CUDA tensors, this module's reference elsewhere. `adamw_update` builds its kernel tables
on every call; `PreparedUpdate` builds them once for segments that are updated step after step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nf4lora.kernels.dispatch import use_triton
from nf4lora.nf4.blockwise import dequantize_blockwise, quantize_blockwise
from nf4lora.nf4.codebook import dynamic_map

QBLOCK = 256  # elements per absmax block of 8-bit optimizer states, as in bitsandbytes' blockwise optimizers
STATE_FIELDS_32 = ("exp_avg", "exp_avg_sq")
STATE_FIELDS_8 = ("state1", "state2", "absmax1", "absmax2")
SCALARS = 8  # per step: decay, beta1, 1 - beta1, beta2, 1 - beta2, step_size, 1 / sqrt(bias_correction2), eps


@dataclass
class Segment:
    """Elements [start, start + numel) of one parameter and their state; the update writes them in place.

    param, grad: contiguous tensors of the same numel (any shape, float dtypes); state: (numel,)-element
    `STATE_FIELDS_32` or `STATE_FIELDS_8` tensors (module docstring); scalars: this segment's row in the table
    passed to `adamw_update`. Segments carry whole tensors and offsets so the kernel path needs no views; the
    optimizers keep one per parameter or page.
    """

    param: torch.Tensor
    grad: torch.Tensor | None
    start: int
    numel: int
    state: dict[str, torch.Tensor]
    scalars: int = 0

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
    # g scaled before it is squared, as torch's addcmul does: g * g overflows float32 from |g| = 1.8e19 on
    v = v * beta2 + (g * one_minus_beta2) * g
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


def adamw_update(segments: list[Segment], scalars: list[list[float]]) -> None:
    """Apply one AdamW step to every segment (same device), Triton or reference per `nf4lora.kernels.dispatch`."""
    if segments and use_triton(segments[0].param.device):
        from nf4lora.optim.triton_adamw import adamw_update_triton  # imports triton: only when it runs

        adamw_update_triton(segments, scalars)
    else:
        adamw_update_reference(segments, scalars)


class PreparedUpdate:
    """`adamw_update` of a fixed list of segments, run once per step with that step's gradients.

    segments: their params, states and `scalars` rows stay fixed (the owner builds a new one when they change);
    grad_index[i]: which of a step's gradients segment i reads, from element `segments[i].start`. On the Triton path
    the kernel tables are built on the first run and kept; a later run whose gradient addresses differ from the
    previous run's uploads only the new addresses.
    """

    def __init__(self, segments: list[Segment], grad_index: list[int]):
        self.segments, self.grad_index = segments, grad_index
        self._launches = None  # [(segment indices, triton_adamw.Launch)], on the first Triton run
        self._offsets: list[int] | None = None  # bytes from each segment's gradient's start to its first element
        self._grad_ptrs: list[int | None] | None = None  # the gradient addresses the launches read

    def run(self, grads: list[torch.Tensor | None], grad_ptrs: list[int | None], scalars: list[list[float]]) -> None:
        """One step: grads (contiguous, dtype of their params) and their `data_ptr()`s, indexed by `grad_index`."""
        if not self.segments:
            return
        if not use_triton(self.segments[0].param.device):
            for seg, i in zip(self.segments, self.grad_index):
                seg.grad = grads[i]
            adamw_update_reference(self.segments, scalars)
            for seg in self.segments:  # holding them would keep gradient memory alive past `zero_grad()`
                seg.grad = None
            return
        from nf4lora.optim.triton_adamw import build_launches, scalar_table  # imports triton: only when it runs

        if self._launches is None:
            seg_grads = [grads[i] for i in self.grad_index]
            offsets = [seg.start * g.element_size() for seg, g in zip(self.segments, seg_grads)]
            whole = self.grad_index == list(range(len(grads))) and not any(offsets)
            self._offsets = None if whole else offsets
            self._launches = build_launches(self.segments, seg_grads, self._addresses(grad_ptrs))
        elif grad_ptrs != self._grad_ptrs:
            addresses = self._addresses(grad_ptrs)
            for indices, launch in self._launches:
                launch.set_grads(addresses if len(indices) == len(addresses) else [addresses[j] for j in indices])
        self._grad_ptrs = grad_ptrs
        table = scalar_table(scalars, self.segments[0].param.device)
        for _, launch in self._launches:
            launch(table)

    def _addresses(self, grad_ptrs: list[int | None]) -> list[int]:
        """Each segment's gradient address: `grad_ptrs` itself where segment i is all of gradient i."""
        if self._offsets is None:
            return grad_ptrs
        return [grad_ptrs[i] + offset for i, offset in zip(self.grad_index, self._offsets)]
