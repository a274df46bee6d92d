"""Optimizer tests run the Triton step on CUDA when there is a GPU, else on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET`` must be set before the kernel is first built, which happens lazily on its first launch)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bnb_functional():
    """bitsandbytes.functional, the live reference for the 8-bit state format (CPU)."""
    return pytest.importorskip("bitsandbytes.functional")
