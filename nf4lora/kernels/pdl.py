"""Programmatic dependent launch (Hopper and later): a kernel may start while the one before it in the stream
finishes, and overlap its launch and its first reads with that kernel's tail.

The decode-step kernels (the GEMVs, RMSNorm, RoPE + cache write, attention, SiLU * up) are launched with
``launch_pdl`` where ``enabled(device)`` holds. Inside, each follows one rule: before ``wait_for_producer``
it may read only data no kernel writes during inference (packed weights, absmax, codebooks, norm weights);
every other read, and every write, comes after. ``release_dependents`` lets the next kernel launch; its
programs then run up to their own wait. The wait returns when the previous kernel has completed and its
writes are visible, so memory that the caching allocator hands from one op to the next is never written
early. Without the launch attribute both calls do nothing, and under the interpreter they are not emitted.

The flip side: a read before the wait is not guaranteed to see the previous kernel's writes. Writing a weight in place
(``q.packed.copy_(...)``, ``norm.weight.fill_(...)``) and calling one of these kernels on it as the very next launch
on the stream may read the old values. In the model that cannot happen, since loading, quantizing and optimizer
steps are always followed by other kernels (the embedding lookup first) before a decode kernel runs.

Measured on an H200 (benchmarks/layer_ops.py, 8 Llama-2-7B-shaped NF4 layers, CUDA-graph decode step, on and off
in one process): 0.782 against 0.831 ms/token (benchmarks/results/2026-11-28_layer-ops_h200.md), 0.79 against
0.97 and 0.94 against 0.99 in earlier runs on other machines; tokens identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nf4lora.kernels.dispatch import hopper_or_later, interpreting


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: a CUDA device of compute
    capability 9.0 or later, outside the interpreter."""
    return not interpreting() and hopper_or_later(device)


def launch_meta(device: torch.device) -> dict:
    """The ``PDL`` constexpr and the ``launch_pdl`` launch option for a kernel on ``device``."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible (with PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream launch once every program of this one has called this (with PDL)."""
    if PDL:
        gdc_launch_dependents()
