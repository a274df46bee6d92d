"""Relaunching a compiled Triton kernel with less host work than ``kernel[grid](...)``.

A Triton launch through the JIT (and more so through ``triton.autotune``) binds arguments,
computes specialization keys and looks up caches in Python on every call: about 12 us for a plain
kernel and 40-50 us for an autotuned one on the H200 host here, against 8 us for an aten op.
For a 4096x4096 weight that is more than the dequantize kernel itself (11 us).
``CachedLaunch`` makes the first call for a key the normal way, keeps the ``CompiledKernel``
it returns with the grid and the tuned meta-parameters, and later calls go straight to
``compiled[grid](*args)``.

The key decides which binary runs, so it must cover what Triton specializes on: the caller's key
(sizes, dtypes, constexpr values) plus, added here, each tensor argument's 16-byte alignment and the GPU
(a binary is loaded into one device's context). Triton launches on the current device, so a call whose
tensors sit on another GPU (a model split over GPUs) switches to it first.
Under the interpreter every call takes the normal path.

The autotuned kernels also keep their timings on disk (``triton.autotune(..., cache_results=True)``, in Triton's
cache directory, keyed by Triton version, GPU target, kernel source and tuning key), so only the first process on
a machine benchmarks the tilings for a given weight size; later ones read the choice (and the compiled binary) back.
On an H200, quantize + dequantize + GEMV at M = 1, 2, 8 over the three Llama-2-7B projection shapes took 8.8 s in a
process that had the binaries but no timings on disk, and 1.0 s in the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from nf4lora.kernels.dispatch import interpreting, on_device


class CachedLaunch:
    """Wrap a ``triton.jit`` (or ``triton.autotune``) kernel; call with the grid, positional args and meta."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.arg_names = kernel.arg_names  # a JITFunction's or an Autotuner's: every parameter, in order
        self.compiled: dict[Hashable, tuple] = {}

    def __call__(self, grid: Callable[[dict], tuple], key: Hashable, *args, **meta) -> None:
        """Launch ``kernel[grid](*args, **meta)`` on the GPU that holds the tensor arguments (all on one).
        ``key`` must change whenever a size, dtype or constexpr in ``args``/``meta`` that the kernel
        specializes on changes; the GPU, and what depends on it alone (the PDL constexpr), is keyed here."""
        if interpreting():
            self.kernel[grid](*args, **meta)
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        # a compiled kernel is loaded into one device's context, so the device is part of the key
        key = (key, device, tuple([t.data_ptr() % 16 == 0 for t in tensors]))
        with on_device(device):
            hit = self.compiled.get(key)
            if hit is not None:
                compiled, grid_dims, tail = hit
                compiled[grid_dims](*args, *tail)
                return
            compiled = self.kernel[grid](*args, **meta)
        config = getattr(self.kernel, "best_config", None)
        meta = {**meta, **(config.all_kwargs() if config is not None else {})}
        tail = tuple(meta[name] for name in self.arg_names[len(args):])
        dims = tuple(grid(meta))
        self.compiled[key] = (compiled, dims + (1,) * (3 - len(dims)), tail)
