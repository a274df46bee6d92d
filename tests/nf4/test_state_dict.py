"""bitsandbytes' serialized Linear4bit format, both directions, checked live against bitsandbytes."""

import itertools

import pytest
import torch

from nf4lora.nf4 import dequantize, quantize
from nf4lora.nf4.state_dict import from_bnb_state_dict, to_bnb_state_dict


def _bnb_linear4bit_state_dict(bnb, w, quant_type, double_quant, blocksize):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=w.dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant, blocksize=blocksize
    )
    return layer.to("cpu").state_dict()


def _bnb_dequantize(bnb, state_dict, prefix):
    """bitsandbytes' own decoding of the Linear4bit entries under `prefix` (the way transformers loads them)."""
    param = bnb.nn.Params4bit.from_prequantized(
        data=state_dict[prefix],
        quantized_stats={k.removeprefix(prefix + "."): v for k, v in state_dict.items() if k != prefix},
        requires_grad=False,
        device="cpu",
    )
    return bnb.functional.dequantize_4bit(param.data, param.quant_state)


@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(["nf4", "fp4"], [False, True])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_is_identical_to_bitsandbytes_linear4bit(quant_type, double_quant, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(40, 96).to(dtype)
    theirs = _bnb_linear4bit_state_dict(bnb, w, quant_type, double_quant, 64)
    ours = to_bnb_state_dict(quantize(w, 64, quant_type, double_quant), "weight")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(["nf4", "fp4"], [False, True])))
def test_bitsandbytes_state_dict_loads_and_decodes_identically(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    theirs = _bnb_linear4bit_state_dict(bnb, w, quant_type, double_quant, 128)
    loaded = from_bnb_state_dict(theirs, "weight")
    assert loaded.shape == w.shape and loaded.dtype == w.dtype
    assert torch.equal(dequantize(loaded), _bnb_dequantize(bnb, theirs, "weight"))


def test_our_state_dict_loads_into_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    q = quantize(torch.randn(32, 512), blocksize=64)
    ours = to_bnb_state_dict(q, "layer.weight")
    assert torch.equal(_bnb_dequantize(bnb, ours, "layer.weight"), dequantize(q))


def test_round_trip_preserves_every_field():
    q = quantize(torch.randn(3, 77, dtype=torch.float16), blocksize=32, quant_type="fp4")
    back = from_bnb_state_dict(to_bnb_state_dict(q, "w"), "w")
    assert torch.equal(back.packed, q.packed)
    for name, tensor in q.state.tensors().items():
        assert torch.equal(getattr(back.state, name), tensor), name
    assert (back.shape, back.dtype, back.state.blocksize, back.state.quant_type) == (q.shape, q.dtype, 32, "fp4")


def _state(**overrides):
    sd = to_bnb_state_dict(quantize(torch.randn(16, 64)), "weight")
    sd.update(overrides)
    return {k: v for k, v in sd.items() if v is not None}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"weight.absmax": None}, r"missing key 'weight.absmax'"),
        ({"weight.nested_absmax": None}, r"missing key 'weight.nested_absmax'"),
        ({"weight.quant_state.bitsandbytes__nf4": None}, r"expected exactly one key"),
        ({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)}, r"corrupt"),
        ({"weight.quant_state.bitsandbytes__fp4": torch.tensor([1], dtype=torch.uint8)}, r"expected exactly one"),
        ({"weight.absmax": torch.zeros(3, dtype=torch.uint8)}, r"absmax must have 16 entries"),
        ({"weight": torch.zeros(7, 1, dtype=torch.uint8)}, r"packed codes must be \(512,\) uint8"),
        ({"weight.quant_map": torch.zeros(8)}, r"quant_map must be \(16,\) float32"),
        ({"weight.nested_absmax": torch.zeros(5)}, r"nested_absmax must be \(1,\) float32, got \(5,\)"),
    ],
)
def test_corrupt_or_mismatched_state_is_refused_with_a_named_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(_state(**overrides), "weight")


def test_custom_codebook_cannot_be_written_in_bitsandbytes_format():
    q = quantize(torch.randn(8, 64), code=torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match=r"no place for a 'custom' codebook; valid: nf4, fp4"):
        to_bnb_state_dict(q)
