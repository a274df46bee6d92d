"""Audit of the public host-side API of ``nf4lora.kernels``: bad arguments are one-line TypeError/ValueError naming
the value and the valid ones on every path, and every mode computes the same result."""

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import dequantize, dispatch, nf4_linear, nf4_linear_parts, quantize, use_kernels
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref

MODES = ["triton", "reference"]


def one_line(pattern: str) -> str:
    return rf"^{pattern}$"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [2, 5])  # the GEMV and the tile kernel, which read bias as a dense (N,) array
def test_nf4_linear_adds_a_strided_bias_as_the_reference_does(mode, rows):
    q = quantize_ref(torch.randn(8, 64))
    x = torch.randn(rows, 64)
    bias = torch.randn(16)[::2]
    with use_kernels(mode):
        y = nf4_linear(x, q, bias)
    expected = F.linear(x.double(), dequantize_ref(q, torch.float32).double(), bias.double())
    assert float((y.double() - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "x, bias, error, message",
    [
        (torch.tensor(1.0), None, ValueError, r"x must be \(\.\.\., in_features\), got a 0-d tensor"),
        ([[1.0] * 64], None, TypeError, r"x must be a torch\.Tensor, got list"),
        (torch.randn(2, 64, device="meta"), None, ValueError, r"x is on meta but qweight is on cpu; move both to one device"),
        (torch.randn(2, 64), 0.5, TypeError, r"bias must be a torch\.Tensor or None, got float"),
        (torch.randn(2, 64), torch.arange(8), TypeError, r"bias has dtype torch\.int64; valid: float32, float16, bfloat16"),
        (torch.randn(2, 64), torch.randn(8, device="meta"), ValueError, r"bias is on meta but x is on cpu; move both to one device"),
    ],
    ids=["0-d x", "list x", "x on another device", "float bias", "int bias", "bias on another device"],
)
def test_nf4_linear_refuses_bad_arguments_in_one_line(mode, x, bias, error, message):
    q = quantize_ref(torch.randn(8, 64))
    with use_kernels(mode), pytest.raises(error, match=one_line(message)):
        nf4_linear(x, q, bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "x, qweights, error, message",
    [
        (torch.tensor(1.0), "two", ValueError, r"x must be \(\.\.\., in_features\), got a 0-d tensor"),
        ([1.0] * 64, "two", TypeError, r"x must be a torch\.Tensor, got list"),
        (torch.randn(1, 64), "one", TypeError, r"qweights must be a list of QuantizedTensor, got QuantizedTensor"),
    ],
    ids=["0-d x", "list x", "one weight"],
)
def test_nf4_linear_parts_refuses_bad_arguments_in_one_line(mode, x, qweights, error, message):
    q = quantize_ref(torch.randn(8, 64))
    with use_kernels(mode), pytest.raises(error, match=one_line(message)):
        nf4_linear_parts(x, [q, q] if qweights == "two" else q)


@pytest.mark.parametrize("mode", MODES)
def test_quantize_refuses_a_non_tensor_in_one_line(mode):
    with use_kernels(mode), pytest.raises(TypeError, match=r"^cannot quantize weight of type list; valid: torch\.Tensor"):
        quantize([1.0, 2.0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float16", torch.float64, torch.int32])
def test_dequantize_refuses_an_unsupported_dtype_alike_in_every_mode(mode, dtype):
    q = quantize_ref(torch.randn(8, 64))
    with use_kernels(mode), pytest.raises(TypeError, match=one_line(rf"cannot dequantize to {dtype}; valid: float32, float16, bfloat16")):
        dequantize(q, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_dequantize_refuses_a_plain_tensor_in_one_line(mode):
    with use_kernels(mode), pytest.raises(TypeError, match=one_line("q must be a QuantizedTensor, got Tensor")):
        dequantize(torch.randn(8, 64))


def test_forced_triton_on_a_cpu_tensor_outside_the_interpreter_raises(monkeypatch):
    """Compiled kernels cannot read CPU memory: say so instead of handing Triton a CPU pointer."""
    monkeypatch.setitem(dispatch._PROCESS, "interpret", False)
    with use_kernels("triton"), pytest.raises(ValueError, match=r"^NF4LORA_KERNELS='triton' on a CPU tensor needs TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.device("cpu"))


def test_forced_triton_on_a_meta_tensor_raises_in_one_line():
    """Shape inference on a model built on the meta device takes the reference in auto mode; a forced Triton path
    has no kernel for it (it failed inside Triton, naming no device)."""
    q = quantize_ref(torch.randn(8, 64)).to("meta")
    x = torch.randn(3, 64, device="meta", dtype=torch.float16)
    with use_kernels("triton"), pytest.raises(ValueError, match=one_line(
            r"NF4LORA_KERNELS='triton' has no kernels for meta tensors; valid: cuda \(cpu under TRITON_INTERPRET=1\), "
            r"or use 'auto' or 'reference'")):
        nf4_linear(x, q)


@pytest.mark.parametrize("rows", [1, 3, 17])  # the GEMV, the tile kernel, dequantize + GEMM
def test_every_mode_agrees_on_an_odd_number_of_outputs(rows):
    q = quantize_ref(torch.randn(7, 64))
    x = torch.randn(rows, 64, dtype=torch.float16)
    bias = torch.randn(7, dtype=torch.float16)
    outputs = {}
    for mode in ("auto", *MODES):
        with use_kernels(mode):
            outputs[mode] = nf4_linear(x, q, bias).double()
    for mode in ("auto", "triton"):
        assert float((outputs[mode] - outputs["reference"]).norm() / outputs["reference"].norm()) < 1e-2
