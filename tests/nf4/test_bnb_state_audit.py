"""Audit of `from_bnb_state_dict` against bitsandbytes' own reader: states that bitsandbytes would decode
differently from us, or refuse, are refused here with the key and the problem named."""

import json

import pytest
import torch

from nf4lora.nf4 import fp4_code, nf4_code, quantize
from nf4lora.nf4.state_dict import from_bnb_state_dict, to_bnb_state_dict


def _state_dict(quant_type="nf4", double_quant=True, meta=None):
    """bitsandbytes entries of a random (16, 64) weight under "weight", with `meta` fields set in its quant_state."""
    sd = to_bnb_state_dict(quantize(torch.randn(16, 64), quant_type=quant_type, double_quant=double_quant), "weight")
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    fields = {**json.loads(bytes(sd[key].tolist())), **(meta or {})}
    sd[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize(("quant_type", "other_code"), [("nf4", fp4_code), ("fp4", nf4_code)])
def test_quant_map_that_is_not_the_quant_types_codebook_is_refused(quant_type, other_code):
    # bitsandbytes decodes with the table of quant_type and never reads quant_map; we decode with quant_map, so a
    # state where the two disagree would load as different weights in the two libraries
    sd = _state_dict(quant_type)
    sd["weight.quant_map"] = other_code()
    with pytest.raises(ValueError, match=rf"weight.quant_map is not the {quant_type} codebook"):
        from_bnb_state_dict(sd, "weight")


def test_nested_tensors_without_a_nested_offset_are_refused():
    # a state without double quantization plus stray nested_* tensors: bitsandbytes fails on the missing
    # nested_offset; silently dropping the tensors could hide a quant_state JSON that lost its nested fields
    sd = _state_dict(double_quant=False)
    sd["weight.nested_absmax"], sd["weight.nested_quant_map"] = torch.ones(1), torch.ones(256)
    with pytest.raises(ValueError, match=r"has weight.nested_absmax, weight.nested_quant_map but no nested_offset"):
        from_bnb_state_dict(sd, "weight")


@pytest.mark.parametrize("nested_dtype", ["float16", "bfloat16", 32])
def test_nested_dtype_other_than_float32_is_refused(nested_dtype):
    # bitsandbytes decodes the 8-bit absmax in nested_dtype before adding the offset; we decode in float32
    with pytest.raises(ValueError, match=rf"has nested_dtype {nested_dtype!r}; valid: 'float32'"):
        from_bnb_state_dict(_state_dict(meta={"nested_dtype": nested_dtype}), "weight")


def test_unknown_quant_state_field_is_refused():
    # bitsandbytes' QuantState.from_dict asserts its keys are known ones; a field we do not know could change
    # what the others mean
    with pytest.raises(ValueError, match=r"has unknown field\(s\) \['zero_point'\]; valid: quant_type, blocksize"):
        from_bnb_state_dict(_state_dict(meta={"zero_point": 0}), "weight")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_own_states_still_load(quant_type, double_quant):
    q = quantize(torch.randn(16, 64), quant_type=quant_type, double_quant=double_quant)
    back = from_bnb_state_dict(to_bnb_state_dict(q), "weight")
    assert torch.equal(back.dequantize(), q.dequantize())
