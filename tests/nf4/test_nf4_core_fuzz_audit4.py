"""Fourth fuzz audit of the NF4 core's public API: `.to()` given a dtype (it used to cast the uint8 absmax of a
state silently, or fail with a misleading shape message), a custom codebook that requires grad (it put the decoded
weight in an autograd graph), non-QuantizedTensor arguments (AttributeErrors), and double quantization over many
blocks whose centred absmax is all zero or ends in a partial nested block, bit for bit against bitsandbytes."""

import pytest
import torch

from nf4lora.nf4 import QuantizedTensor, dequantize, quantize


def _weight(numel: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(numel, generator=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_quant_state_to_a_dtype_is_refused_not_cast(dtype):
    q = quantize(_weight(300, torch.Generator().manual_seed(1)))
    with pytest.raises(TypeError, match=r"moves to a device only, got torch\.\w+; valid: .*dequantize\(dtype\)"):
        q.state.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_tensor_to_a_dtype_names_the_dtype(dtype):
    q = quantize(_weight(300, torch.Generator().manual_seed(2)))
    with pytest.raises(TypeError, match=r"moves to a device only, got torch\.(float16|bfloat16)"):
        q.to(dtype)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_to_a_device_keeps_every_byte(device):
    q = quantize(_weight(301, torch.Generator().manual_seed(3)), blocksize=32)
    moved = q.to(device)
    assert torch.equal(moved.packed, q.packed)
    assert all(torch.equal(t, q.state.tensors()[name]) for name, t in moved.state.tensors().items())
    assert moved.state.absmax.dtype == torch.uint8
    assert torch.equal(moved.dequantize(), q.dequantize())


def test_custom_codebook_that_requires_grad_keeps_no_graph():
    code = torch.linspace(-1, 1, 16).requires_grad_()
    q = quantize(_weight(128, torch.Generator().manual_seed(4)), code=code, double_quant=False)
    assert not q.state.code.requires_grad
    assert not q.dequantize().requires_grad


def test_dequantize_of_a_plain_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="dequantize needs a QuantizedTensor, got Tensor"):
        dequantize(torch.randn(4))


def test_quantized_tensor_from_non_tensor_codes_is_a_type_error():
    state = quantize(torch.randn(4)).state
    with pytest.raises(TypeError, match="needs a uint8 torch.Tensor of packed codes and a QuantState, got list"):
        QuantizedTensor([1, 2], state)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("constant_absmax", [True, False])
def test_double_quant_over_many_blocks_matches_bitsandbytes(bnb_functional, blocksize, constant_absmax):
    g = torch.Generator().manual_seed(blocksize + constant_absmax)
    nblocks = int(torch.randint(257, 700, (), generator=g)) if blocksize < 4096 else 3  # a partial nested block
    numel = nblocks * blocksize - int(torch.randint(0, blocksize, (), generator=g))
    w = _weight(numel, g)
    if constant_absmax:  # every block's absmax is the offset: the centred absmax is all zero
        w = w.sign() * 0.37
    q = quantize(w, blocksize=blocksize)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.state.absmax, state.absmax)
    assert torch.equal(q.state.nested_absmax, state.state2.absmax)
    assert torch.equal(q.state.offset, state.offset)
    assert torch.equal(q.dequantize(), bnb_functional.dequantize_4bit(packed, state).reshape(-1))
