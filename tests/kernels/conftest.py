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
