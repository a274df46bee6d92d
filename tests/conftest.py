"""Suite-wide setup: reference libraries run eagerly, GPU tests skip on machines without CUDA, and there the Triton
kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET`` must be set before a kernel module is
first imported, which the dispatchers do lazily)."""

import logging
import os
import random

# bitsandbytes wraps its CPU fallbacks in torch.compile; compiling them costs CI minutes and changes no result.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    """A fresh random seed for Python's and torch's generators, printed so that a failing case can be replayed."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown when a case fails, to replay it
    torch.manual_seed(seed)
    return random.Random(seed)


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, the reference of the 4-bit format (skips without it), with its warnings silenced."""
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its slow-fp16-inference warnings
    return bnb
