"""Optimizer tests run the Triton step on CUDA when there is a GPU, else on CPU tensors under Triton's interpreter
(set up in tests/conftest.py)."""

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bnb_functional():
    """bitsandbytes.functional, the live reference for the 8-bit state format (CPU)."""
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The optimizer tests step small tensors, where intra-op threads only add synchronisation (and, on a busy
    2-core runner, spin for milliseconds per op): run them on one thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
