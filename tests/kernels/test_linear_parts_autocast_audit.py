"""``nf4_linear_parts`` under ``torch.autocast`` and ``nf4_linear`` on meta tensors (helper audit of the dispatcher)."""

import pytest
import torch

from nf4lora.kernels import gemv_nf4, nf4_linear, nf4_linear_parts, use_kernels
from nf4lora.nf4.tensor import quantize as quantize_ref


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("M", [1, 3], ids=["fused-parts", "one-call-per-weight"])
def test_nf4_linear_parts_under_autocast_computes_in_the_autocast_dtype(device, monkeypatch, mode, M):
    """As ``[nf4_linear(x, W) for W ...]`` does: under autocast the outputs are the call on x cast to autocast's
    dtype, on every path. (The fused launch for 1 or 2 rows computed in x's dtype, float32, while more rows and the
    reference path computed in float16: the dtype and the rounding depended on the rows and the mode.)"""
    launches = []
    real = gemv_nf4.fused_matmul_parts
    monkeypatch.setattr(gemv_nf4, "fused_matmul_parts", lambda *args: launches.append(1) or real(*args))
    weights = [quantize_ref(torch.randn(n, 128)).to(device) for n in (40, 24)]
    x = torch.randn(M, 128, device=device)
    # float16, not bfloat16: the interpreter's bf16 outputs are truncated (kernel_helpers.skip_interpreter_bf16)
    with use_kernels(mode), torch.no_grad():
        with torch.autocast(device.type, dtype=torch.float16):
            outs = nf4_linear_parts(x, weights)
        expected = nf4_linear_parts(x.half(), weights)
    assert len(launches) == int(mode == "triton" and M == 1) * 2  # the fused launch ran in both calls
    for out, exp in zip(outs, expected):
        assert out.dtype == torch.float16
        assert torch.equal(out, exp)  # the same path on the same float16 operands


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_nf4_linear_on_meta_tensors_gives_a_meta_result(mode):
    """A weight and x on the meta device (shape inference on a model built there) give meta outputs of the right
    shape and dtype. (The autocast check asked torch about autocast on 'meta', which raised a RuntimeError.)"""
    q = quantize_ref(torch.randn(8, 64)).to("meta")
    x = torch.randn(3, 64, device="meta", dtype=torch.float16)
    with use_kernels(mode):
        y = nf4_linear(x, q)
        parts = nf4_linear_parts(x, [q, q])
    assert y.device.type == "meta" and y.shape == (3, 8) and y.dtype == torch.float16
    assert all(p.device.type == "meta" and p.shape == (3, 8) for p in parts)
