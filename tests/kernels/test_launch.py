"""``CachedLaunch``'s bookkeeping, with a stand-in for a Triton kernel (its fast path needs a GPU otherwise)."""

import threading
import types

import pytest
import torch
from triton import knobs

from nf4lora.kernels import launch
from nf4lora.kernels.launch import CachedLaunch


class FakeKernel:
    """Records launches like ``kernel[grid](*args, **meta)``; returns a fake compiled kernel."""

    arg_names = ["x_ptr", "n", "BLOCK", "SCALE"]

    def __init__(self):
        self.jit_calls = []
        self.fast_calls = []
        self.hooked_calls = []
        self.best_config = types.SimpleNamespace(all_kwargs=lambda: {"BLOCK": 128, "num_warps": 4})

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.jit_calls.append((grid({**meta, "BLOCK": 128}), args, meta))
            return FakeCompiled(self)

        return run


class FakeCompiled:
    """Records relaunches through its launcher (``run``) and through ``compiled[grid]`` (``hooked_calls``)."""

    function = "function handle"
    packed_metadata = "packed metadata"

    def __init__(self, kernel):
        self.kernel = kernel

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        assert (stream, function, metadata) == (CURRENT_STREAM, self.function, self.packed_metadata)
        self.kernel.fast_calls.append(((gx, gy, gz), args))

    def __getitem__(self, grid_dims):
        return lambda *args: self.kernel.hooked_calls.append((grid_dims, args))


CURRENT_STREAM = 1234


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    """Take the compiled-kernel path (not the interpreter's), with a stand-in for Triton's GPU driver."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    active = types.SimpleNamespace(get_current_stream=lambda device_index: CURRENT_STREAM)
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=active))


def test_cached_launch_relaunches_compiled_kernel_with_tuned_meta_and_rekeys_on_alignment():
    kernel = FakeKernel()
    cached = CachedLaunch(kernel)
    buffer = torch.zeros(64)
    grid = lambda meta: (triton_cdiv(1000, meta["BLOCK"]),)  # noqa: E731
    for _ in range(3):
        cached(grid, ("n", 1000), buffer, 1000, SCALE=2.0, enable_fp_fusion=False)
    assert len(kernel.jit_calls) == 1 and len(kernel.fast_calls) == 2
    # every kernel parameter, in order: the tuned BLOCK comes from the best config; launch options are dropped
    assert kernel.fast_calls[0] == ((8, 1, 1), (buffer, 1000, 128, 2.0))
    cached(grid, ("n", 1000), buffer[1:], 1000, SCALE=2.0)  # 4-byte offset: not 16-byte aligned, a new binary
    cached(grid, ("n", 2000), buffer, 1000, SCALE=2.0)  # a new caller key
    assert len(kernel.jit_calls) == 3 and len(kernel.fast_calls) == 2 and not kernel.hooked_calls


def test_cached_launch_relaunches_through_compiled_grid_while_a_launch_hook_is_installed():
    kernel = FakeKernel()
    cached = CachedLaunch(kernel)
    buffer = torch.zeros(64)
    hook = lambda metadata: None  # noqa: E731
    cached(lambda meta: (2,), "key", buffer, 64, SCALE=1.0)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        cached(lambda meta: (2,), "key", buffer, 64, SCALE=1.0)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    cached(lambda meta: (2,), "key", buffer, 64, SCALE=1.0)
    assert kernel.hooked_calls == [((2, 1, 1), (buffer, 64, 128, 1.0))]
    assert kernel.fast_calls == [((2, 1, 1), (buffer, 64, 128, 1.0))]


def test_cached_launch_always_takes_the_normal_path_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    kernel = FakeKernel()
    cached = CachedLaunch(kernel)
    for _ in range(2):
        cached(lambda meta: (1,), "key", torch.zeros(4), 4, SCALE=1.0)
    assert len(kernel.jit_calls) == 2 and not kernel.fast_calls


class OnSecondGpu(torch.Tensor):
    """A CPU tensor that reports cuda:1, standing in for a weight on a model's second GPU."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_cached_launch_runs_on_the_gpu_of_its_tensors_and_keys_binaries_by_gpu(monkeypatch):
    current = [0]  # the process's current CUDA device, as the fakes below keep it

    class FakeDevice:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    kernel = FakeKernel()
    seen = []  # the current device at each launch
    jit, fast = FakeKernel.__getitem__, FakeCompiled.run
    monkeypatch.setattr(FakeKernel, "__getitem__", lambda self, grid: (seen.append(current[0]), jit(self, grid))[1])
    monkeypatch.setattr(FakeCompiled, "run", lambda self, *a: (seen.append(current[0]), fast(self, *a))[1])
    cached = CachedLaunch(kernel)
    on_second = torch.zeros(64).as_subclass(OnSecondGpu)
    for _ in range(2):
        cached(lambda meta: (1,), "key", on_second, 64, SCALE=1.0)
    cached(lambda meta: (1,), "key", torch.zeros(64), 64, SCALE=1.0)  # same key, other device: its own binary
    assert seen == [1, 1, 0] and current[0] == 0
    assert len(kernel.jit_calls) == 2 and len(kernel.fast_calls) == 1


class InterleavingTuner(FakeKernel):
    """An autotuner's first launches on two threads at once: each tunes BLOCK for its n and keeps the choice in the
    shared ``best_config``, and the launch for n = 1000 lingers (up to a timeout) until the other one has tuned."""

    def __init__(self):
        super().__init__()
        self.first_tuning, self.second_tuned = threading.Event(), threading.Event()

    def __getitem__(self, grid):
        def run(x, n, **meta):
            block = 128 if n == 1000 else 512
            self.best_config = types.SimpleNamespace(all_kwargs=lambda: {"BLOCK": block})
            if n == 1000:
                self.first_tuning.set()
                self.second_tuned.wait(timeout=0.5)
            else:
                self.second_tuned.set()
            self.jit_calls.append((grid({**meta, "BLOCK": block}), (x, n), meta))
            return FakeCompiled(self)

        return run


def test_first_launches_on_two_threads_keep_their_own_tuned_meta():
    """Both threads' first launches used to run at once, and the first read the second's ``best_config``: its
    relaunches went out with BLOCK 512 and a grid of 2 programs for 1000 elements, leaving most of them undone."""
    kernel, buffer, launch_n = interleaved_first_launches(second_n=4096)
    launch_n(1000)
    launch_n(4096)
    assert kernel.fast_calls == [((8, 1, 1), (buffer, 1000, 128, 1.0)), ((8, 1, 1), (buffer, 4096, 512, 1.0))]


def test_a_first_launch_that_waited_on_one_of_the_same_key_relaunches_its_binary():
    kernel, buffer, _ = interleaved_first_launches(second_n=1000)
    assert len(kernel.jit_calls) == 1 and kernel.fast_calls == [((8, 1, 1), (buffer, 1000, 128, 1.0))]


def interleaved_first_launches(second_n: int):
    """Start a first launch for n = 1000 on a thread and, while it tunes, one for ``second_n`` on this thread.
    Returns the kernel, the launches' buffer and the launch function (by n)."""
    kernel = InterleavingTuner()
    cached = CachedLaunch(kernel)
    buffer = torch.zeros(64)
    launch_n = lambda n: cached(lambda meta: (triton_cdiv(n, meta["BLOCK"]),), ("n", n), buffer, n, SCALE=1.0)  # noqa: E731
    first = threading.Thread(target=launch_n, args=(1000,))
    first.start()
    assert kernel.first_tuning.wait(timeout=10)
    launch_n(second_n)
    first.join()
    return kernel, buffer, launch_n


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
