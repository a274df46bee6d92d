"""Regressions from a fuzz audit of the Triton kernels (under the interpreter on CPU) against the PyTorch references.

Each case is one input the fuzzing found to crash, to be read wrongly, or to be refused without naming what is
wrong; results are compared with float64 ``F.linear`` on the same rounded operands (the module tests' tolerances)
or with the reference dequantization bit for bit.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import dequantize, nf4_linear, use_kernels
from nf4lora.kernels.dequantize_nf4 import dequantize_into
from nf4lora.kernels.gemv_nf4 import fused_matmul, fused_matmul_parts
from nf4lora.nf4.tensor import QuantizedTensor
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked-off lanes

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}  # as test_gemv_nf4 (bf16 outputs need a GPU)


def linear_ref(x, q, bias=None):
    w = dequantize_ref(q.to("cpu"), x.dtype).double()
    return F.linear(x.cpu().double(), w, None if bias is None else bias.cpu().to(x.dtype).double())


def rel_err(out, ref) -> float:
    return float((out.detach().cpu().double() - ref).norm() / ref.norm())


def one_line(pattern: str) -> str:
    return rf"^{pattern}$"


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_fused_kernels_take_one_row_of_x_whatever_its_row_stride(poisoned, device, dtype):
    """A single row is contiguous whatever its stride, so ``x.T`` of a (K, 1) column passes ``contiguous()``
    unchanged with stride (1, 1); the GEMVs view x as 8-byte words, which that stride made torch refuse
    ("self.stride(0) must be divisible by 4 to view Half as Long")."""
    torch.manual_seed(0)
    weights = [quantize_ref(torch.randn(n, 128), 64, "nf4", True) for n in (24, 8)]
    x = torch.randn(128, 1).to(device=device, dtype=dtype).t()
    assert x.is_contiguous() and x.stride(0) == 1
    bias = torch.randn(24)
    out = fused_matmul(x, weights[0].to(device), bias.to(device))
    assert rel_err(out, linear_ref(x, weights[0], bias)) < TOLERANCE[dtype]
    parts = fused_matmul_parts(x, [q.to(device) for q in weights])
    assert rel_err(parts, torch.cat([linear_ref(x, q) for q in weights], dim=1)) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "x_shape, bias_shape, error, message",
    [
        # the kernels read K columns of x per row of W: a wider x was summed over its first 64 columns, a narrower
        # one read past its end (both returned a result)
        ((2, 128), None, ValueError, r"x has 128 features in its last dim, expected in_features=64"),
        ((3, 32), None, ValueError, r"x has 32 features in its last dim, expected in_features=64"),
        ((2, 64), (5,), ValueError, r"bias has shape \(5,\), expected \(8,\)"),  # read 8 entries of 5
        ((64,), None, ValueError, r"x2d must be 2-D \(M, K\), got shape \(64,\)"),  # "not enough values to unpack"
    ],
    ids=["wider x", "narrower x", "short bias", "1-d x"],
)
def test_fused_matmul_refuses_mismatched_arguments_in_one_line(device, x_shape, bias_shape, error, message):
    q = quantize_ref(torch.randn(8, 64), 32).to(device)
    bias = None if bias_shape is None else torch.randn(bias_shape, device=device)
    with pytest.raises(error, match=one_line(message)):
        fused_matmul(torch.randn(x_shape, device=device), q, bias)


def test_fused_matmul_refuses_x_of_an_unsupported_dtype_in_one_line(device):
    """A float64 x raised KeyError('torch.float64') on the GEMV path."""
    q = quantize_ref(torch.randn(8, 64)).to(device)
    with pytest.raises(TypeError, match=one_line(r"x has dtype torch\.float64; valid: float32, float16, bfloat16")):
        fused_matmul(torch.randn(1, 64, dtype=torch.float64, device=device), q)


def test_fused_matmul_of_no_rows_is_empty(device):
    """M = 0 divided by zero while sizing split-K (``nf4_linear`` returns early; ``fused_matmul`` did not)."""
    q = quantize_ref(torch.randn(8, 64)).to(device)
    out = fused_matmul(torch.randn(0, 64, dtype=torch.float16, device=device), q)
    assert out.shape == (0, 8) and out.dtype == torch.float16


def test_dequantize_into_refuses_out_on_another_device_in_one_line(device):
    """An ``out`` on another device reached the kernel launch ("Cannot copy out of meta tensor; no data!")."""
    q = quantize_ref(torch.randn(4, 64)).to(device)
    with pytest.raises(ValueError, match=one_line(rf"out is on meta but q is on {device}; valid: out on q's device")):
        dequantize_into(q, torch.empty(4, 64, device="meta"))
    with pytest.raises(ValueError, match=one_line(
            r"out must be contiguous with 256 elements, got 256 \(strides \(1, 4\)\)")):
        dequantize_into(q, torch.empty(64, 4, device=device).t())  # said "got 256", naming nothing wrong


@pytest.mark.parametrize("blocksize", [4, 2])
def test_kernels_refuse_a_blocksize_outside_the_supported_ones_in_one_line(triton_mode, device, blocksize):
    """The blocksize check let every even power of two through while naming 32..4096 as valid; below 8 a block is
    less than one 32-bit word and the kernel failed inside Triton (``arange``'s end must exceed its start)."""
    q = quantize_ref(torch.randn(8, 64), 32, double_quant=False)
    n_blocks = q.numel() // blocksize
    q = QuantizedTensor(q.packed, dataclasses.replace(q.state, blocksize=blocksize, absmax=torch.ones(n_blocks)))
    with pytest.raises(ValueError, match=one_line(
            rf"blocksize {blocksize} is not supported; valid: 32, 64, 128, 256, 512, 1024, 2048, 4096")):
        dequantize(q.to(device))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view of stride 2, the other half of the storage filled with 7s."""
    return torch.stack([t, torch.full_like(t, 7)], dim=-1)[..., 0]


@pytest.mark.parametrize("field", ["absmax", "code", "nested_absmax", "nested_code"])
def test_kernels_refuse_strided_state_tensors_in_one_line(triton_mode, device, field):
    """The kernels index the state as dense arrays: a strided view (here of stride 2) was read as if contiguous,
    so dequantize and nf4_linear returned wrong values where the reference reads it right."""
    q = quantize_ref(torch.randn(24, 1024), 32, "nf4", double_quant=True)  # 768 blocks: 3 nested ones
    q = QuantizedTensor(q.packed, dataclasses.replace(q.state, **{field: _strided(getattr(q.state, field))}))
    q = q.to(device)
    message = one_line(rf"state\.{field} has strides \(2,\); the kernels need it contiguous \(\.contiguous\(\)\)")
    with pytest.raises(ValueError, match=message):
        dequantize(q, torch.float32)
    with pytest.raises(ValueError, match=message):
        nf4_linear(torch.randn(2, 1024, device=device), q)


@pytest.mark.parametrize("rows", [1, 3, 17])  # the GEMV, the tile kernel, dequantize + GEMM
def test_kernels_read_strided_packed_codes(poisoned, device, rows):
    """Packed codes in a strided view (a slice of a wider byte buffer) could not be viewed as int32 words
    ("self.stride(-1) must be 1 to view Byte as Int"); they are copied, as misaligned ones are."""
    q = quantize_ref(torch.randn(24, 128), 32, "fp4", double_quant=False)
    q_strided = QuantizedTensor(_strided(q.packed), q.state).to(device)
    with use_kernels("triton"):
        assert torch.equal(dequantize(q_strided, torch.float16).cpu(), dequantize_ref(q, torch.float16))
        x = torch.randn(rows, 128)
        out = nf4_linear(x.to(device), q_strided)
    assert rel_err(out, linear_ref(x, q)) < TOLERANCE[torch.float32]

