"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on CPU tensors under Triton's
interpreter (set up in tests/conftest.py)."""

import pytest
import torch

POISON_FLOAT = float("nan")
POISON_BYTE = 0xA5


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_mode(monkeypatch):
    """Force the Triton path for the test (the env override, as users would set it)."""
    monkeypatch.setenv("NF4LORA_KERNELS", "triton")


@pytest.fixture
def poisoned(monkeypatch):
    """Make ``torch.empty`` return poisoned memory (NaN floats, 0xA5 bytes), so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(POISON_FLOAT)
        elif t.dtype == torch.uint8:
            t.fill_(POISON_BYTE)
        return t

    monkeypatch.setattr(torch, "empty", empty)


class KernelLaunches(list):
    """Names of the Triton kernels launched, in order; ``running`` is True while one of them runs."""

    running = False


@pytest.fixture
def kernel_launches(monkeypatch) -> KernelLaunches:
    """The Triton kernels launched during the test, as Triton's interpreter runs them (the test is skipped where
    kernels are compiled instead)."""
    from nf4lora.kernels import dispatch

    if not dispatch.interpreting():
        pytest.skip("kernel launches are recorded through Triton's interpreter")
    from triton.runtime import interpreter

    launched = KernelLaunches()
    run = interpreter.GridExecutor.__call__

    def record(executor, *args, **kwargs):
        launched.append(executor.fn.__name__)
        launched.running = True
        try:
            return run(executor, *args, **kwargs)
        finally:
            launched.running = False

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    return launched


@pytest.fixture
def split_k_counts(monkeypatch) -> list[int]:
    """The number of K chunks of each split-K launch of ``gemv_nf4`` during the test, in order."""
    from nf4lora.kernels import gemv_nf4

    counts = []
    real = gemv_nf4._split_k_buffers

    def record(*args):
        buffers = real(*args)
        counts.append(buffers[1])
        return buffers

    monkeypatch.setattr(gemv_nf4, "_split_k_buffers", record)
    return counts
