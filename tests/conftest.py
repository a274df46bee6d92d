"""Suite-wide setup: reference libraries run eagerly, GPU tests skip on machines without CUDA, and there the Triton
kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET`` must be set before a kernel module is
first imported, which the dispatchers do lazily)."""

import os

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
