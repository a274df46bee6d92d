import pytest
import torch

from nf4lora.nf4.codebook import dynamic_map, fp4_code, get_code, nf4_code, quantize_bounds


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("quant_type,ours", [("nf4", nf4_code), ("fp4", fp4_code)])
def test_4bit_codebook_equals_bitsandbytes_bit_for_bit(bnb_functional, quant_type, ours):
    theirs = bnb_functional.get_4bit_type(quant_type, device="cpu")
    assert ours().dtype == torch.float32
    assert torch.equal(_bits(ours()), _bits(theirs))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes_bit_for_bit(bnb_functional, signed):
    assert torch.equal(_bits(dynamic_map(signed)), _bits(bnb_functional.create_dynamic_map(signed=signed)))


def test_nf4_is_asymmetric_with_exact_zero_and_unit_range():
    code = nf4_code()
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0
    assert (code[1:] > code[:-1]).all()
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7


def test_codebooks_are_fresh_copies():
    code = nf4_code()
    code[0] = 5.0
    assert nf4_code()[0] == -1


def test_quantize_bounds_sorts_any_codebook_and_ties_go_low():
    code = torch.tensor([0.5, -1.0, 1.0, 0.0])
    bounds, order = quantize_bounds(code)
    assert torch.equal(bounds, torch.tensor([-0.5, 0.25, 0.75]))
    values = torch.tensor([-0.5, 0.25, 0.2500001, 0.9])
    assert code[order[torch.bucketize(values, bounds)]].tolist() == [-1.0, 0.0, 0.5, 1.0]


def test_unknown_quant_type_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown quant_type 'int4'; valid: nf4, fp4"):
        get_code("int4")
