"""Relaunching a compiled Triton kernel with less host work than ``kernel[grid](...)``.

A Triton launch through the JIT (and more so through ``triton.autotune``) binds arguments,
computes specialization keys and looks up caches in Python on every call: about 12 us for a plain
kernel and 40-50 us for an autotuned one on the H200 host here, against 8 us for an aten op.
For a 4096x4096 weight that is more than the dequantize kernel itself (11 us).
``CachedLaunch`` makes the first call for a key the normal way, keeps the ``CompiledKernel``
it returns with the grid and the tuned meta-parameters, and later calls go straight to the
compiled kernel's launcher (``compiled.run``, with the stream and the function handle that
``compiled[grid](*args)`` would look up). That skips what ``compiled[grid]`` builds per call
for launch hooks (the metadata a profiler such as proton reads), so while a launch hook is
installed the relaunch goes through ``compiled[grid]`` instead. On an H200 host a relaunch of quantize's kernel
took 12.7 us of host time this way, against 16.2 us through ``compiled[grid]`` (medians of 12 alternating rounds
in one process, benchmarks/results/2026-11-29_launch-host_h200.md).

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

import threading
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch
from triton import knobs
from triton.runtime import driver

from nf4lora.kernels.dispatch import interpreting, is_other_gpu, on_device


def _launch_hooks_installed() -> bool:
    """Whether a launch enter/exit hook is set (Triton 3.6 keeps them in chains that are empty by default; a hook
    assigned directly, as older Triton took it, counts too)."""
    runtime = knobs.runtime
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


class _Relaunch(NamedTuple):
    """One compiled binary with what relaunching it needs: the launcher (``compiled.run``), the function handle
    and packed metadata it takes, the grid and the trailing meta-parameters."""

    compiled: object  # the CompiledKernel: holds the loaded module, which Triton unloads when it is freed
    run: Callable
    function: int
    metadata: tuple
    dims: tuple[int, int, int]
    tail: tuple


class CachedLaunch:
    """Wrap a ``triton.jit`` (or ``triton.autotune``) kernel; call with the grid, positional args and meta."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.arg_names = kernel.arg_names  # a JITFunction's or an Autotuner's: every parameter, in order
        self.compiled: dict[Hashable, _Relaunch] = {}
        # An autotuner keeps its latest choice in ``best_config``, so two threads' first launches at once could
        # pair one's binary with the other's tuned meta-parameters (and grid): first launches take turns.
        self._first_launch = threading.Lock()

    def __call__(self, grid: Callable[[dict], tuple], key: Hashable, *args, **meta) -> None:
        """Launch ``kernel[grid](*args, **meta)`` on the GPU that holds the first tensor argument (the others on it
        too, or in pinned host memory, which every GPU addresses).
        ``key`` must change whenever a size, dtype or constexpr in ``args``/``meta`` that the kernel
        specializes on changes; the GPU, and what depends on it alone (the PDL constexpr), is keyed here."""
        if interpreting():
            self.kernel[grid](*args, **meta)
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        # a compiled kernel is loaded into one device's context, so the device is part of the key
        key = (key, device, tuple([t.data_ptr() % 16 == 0 for t in tensors]))
        hit = self.compiled.get(key)
        if hit is None:
            with self._first_launch:
                hit = self.compiled.get(key)  # another thread's first launch of the same key may have just ended
                if hit is None:
                    self._launch_and_keep(grid, key, device, args, meta)
                    return
        if is_other_gpu(device):
            with torch.cuda.device(device):
                self._relaunch(hit, device.index, args)
        else:  # the usual case, without a context manager's enter and exit
            self._relaunch(hit, device.index, args)

    def _launch_and_keep(self, grid: Callable[[dict], tuple], key: Hashable, device: torch.device, args: tuple,
                         meta: dict) -> None:
        """Launch through the JIT (or autotuner) and keep the compiled kernel under ``key`` for relaunches."""
        with on_device(device):
            compiled = self.kernel[grid](*args, **meta)
        config = getattr(self.kernel, "best_config", None)
        meta = {**meta, **(config.all_kwargs() if config is not None else {})}
        tail = tuple(meta[name] for name in self.arg_names[len(args):])
        dims = tuple(grid(meta))
        dims = dims + (1,) * (3 - len(dims))
        self.compiled[key] = _Relaunch(compiled, compiled.run, compiled.function, compiled.packed_metadata, dims, tail)

    @staticmethod
    def _relaunch(hit: _Relaunch, device_index: int, args: tuple) -> None:
        if _launch_hooks_installed():
            hit.compiled[hit.dims](*args, *hit.tail)  # builds the metadata the hooks read
            return
        gx, gy, gz = hit.dims
        stream = driver.active.get_current_stream(device_index)
        hit.run(gx, gy, gz, stream, hit.function, hit.metadata, None, None, None, *args, *hit.tail)
