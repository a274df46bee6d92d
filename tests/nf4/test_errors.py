import pytest
import torch

from nf4lora.nf4 import dequantize, quantize


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"1 NaN or Inf values"):
        quantize(w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64])
def test_unsupported_dtype_names_the_valid_ones(dtype):
    with pytest.raises(TypeError, match=r"valid: float32, float16, bfloat16"):
        quantize(torch.ones(64, dtype=dtype))


def test_empty_tensor_is_refused():
    with pytest.raises(ValueError, match=r"empty weight \(shape \(0, 64\)\)"):
        quantize(torch.empty(0, 64))


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64])
def test_blocksize_outside_range_or_not_power_of_two(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize {blocksize} is not supported; valid: powers of two 32, 64"):
        quantize(torch.randn(128), blocksize=blocksize)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match=r"unknown quant_type 'nf3'; valid: nf4, fp4"):
        quantize(torch.randn(64), quant_type="nf3")


def test_bad_custom_codebook_shape():
    with pytest.raises(ValueError, match=r"custom codebook must be \(16,\) float32"):
        quantize(torch.randn(64), code=torch.linspace(-1, 1, 8))


def test_dequantize_to_integer_dtype_is_refused():
    with pytest.raises(TypeError, match=r"cannot dequantize to torch.int8"):
        dequantize(quantize(torch.randn(64)), torch.int8)
