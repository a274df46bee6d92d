"""Helpers shared by the kernel tests."""

import pytest
import torch

OUTPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_interpreter_bf16(device: torch.device, dtype: torch.dtype) -> None:
    """Triton's interpreter truncates float32 -> bf16 (a GPU rounds to nearest even) and its bf16
    tl.dot is broken, so bf16 outputs are checked on a GPU only."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 outputs need a GPU: the Triton interpreter truncates to bf16")
