"""Helpers shared by the kernel tests."""

import pytest
import torch

OUTPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_interpreter_bf16(device: torch.device, dtype: torch.dtype) -> None:
    """Triton's interpreter truncates float32 -> bf16 (a GPU rounds to nearest even) and its bf16
    tl.dot is broken, so bf16 outputs are checked on a GPU only."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 outputs need a GPU: the Triton interpreter truncates to bf16")


def assert_same_bytes(q, ref):
    """Bytes and state of ``q`` equal ``ref``'s. With double quantization ``ref`` must come from the same device: the
    offset is torch's mean there, whose summation order differs between CPU and CUDA."""
    assert torch.equal(q.packed.cpu(), ref.packed.cpu())
    for name, t in ref.state.tensors().items():
        got = getattr(q.state, name)
        assert got.dtype == t.dtype and torch.equal(got.cpu(), t.cpu()), name
    header = (q.shape, q.dtype, q.state.blocksize, q.state.quant_type)
    assert header == (ref.shape, ref.dtype, ref.state.blocksize, ref.state.quant_type)
    assert q.state.nested_blocksize == ref.state.nested_blocksize
