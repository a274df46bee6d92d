"""Fuzz audit of the NF4 core against bitsandbytes' CPU path: special-value blocks bit for bit, weights and states that
decode to Inf, and malformed quant_state fields that used to load or crash."""

import json

import numpy as np
import pytest
import torch

from nf4lora.kernels import quantize as quantize_dispatched
from nf4lora.kernels import use_kernels
from nf4lora.nf4 import QUANT_TYPES, dequantize, get_code, quantize
from nf4lora.nf4.state_dict import from_bnb_state_dict, to_bnb_state_dict

META_KEY = "weight.quant_state.bitsandbytes__nf4"
FLOAT16_MAX = torch.finfo(torch.float16).max


def _special_block(kind: str, n: int, dtype: torch.dtype, quant_type: str, g: torch.Generator) -> torch.Tensor:
    """n values of one class the fuzzer found worth covering (all exactly representable or rounded once to dtype)."""
    if kind == "zero":
        return torch.zeros(n, dtype=dtype)
    if kind == "negative zero":
        return torch.full((n,), -0.0, dtype=dtype)
    if kind == "constant":
        return torch.full((n,), float(torch.randn((), generator=g)), dtype=dtype)
    if kind == "subnormal":
        tiny = torch.finfo(dtype).smallest_normal
        return (torch.randint(-64, 65, (n,), generator=g) * (tiny / 64)).to(dtype)
    if kind == "tiny absmax":
        return (torch.randn(n, generator=g) * 10 ** -float(torch.randint(30, 39, (), generator=g))).to(dtype)
    if kind == "codes and ties":
        # codebook values and the midpoints between them, times a power of two: the scaled values land exactly
        # on codes and on ties
        code = get_code(quant_type).sort().values
        table = torch.cat([code, (code[:-1] + code[1:]) / 2])
        values = table[torch.randint(table.numel(), (n,), generator=g)]
        values[0] = 1.0
        return (values * 2.0 ** int(torch.randint(-12, 12, (), generator=g))).to(dtype)
    scale = 10 ** float(torch.empty(()).uniform_(-20, 20, generator=g)) if dtype != torch.float16 else 10.0
    return (torch.randn(n, generator=g) * scale).to(dtype)  # "random"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["zero", "negative zero", "constant", "subnormal", "tiny absmax", "codes and ties", "random"]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_value_blocks_match_bitsandbytes_bit_for_bit(bnb_functional, dtype, quant_type):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    g = torch.Generator().manual_seed(DTYPES.index(dtype) * 2 + QUANT_TYPES.index(quant_type))
    for case in range(24):
        blocksize = 2 ** int(torch.randint(5, 13, (), generator=g))
        # runs of whole and partial blocks of mixed classes, so huge and tiny blocks sit side by side
        parts = []
        for _ in range(int(torch.randint(1, 6, (), generator=g))):
            n = blocksize if bool(torch.randint(2, (), generator=g)) else int(torch.randint(1, blocksize, (), generator=g))
            parts.append(_special_block(KINDS[int(torch.randint(len(KINDS), (), generator=g))], n, dtype, quant_type, g))
        flat = torch.cat(parts)
        w = flat.view(1, -1, 1) if case % 3 == 0 else flat  # 3-D and 1-D, odd and sub-block numels
        double_quant = case % 2 == 1
        packed, state = bnb_functional.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        ours = quantize(w, blocksize, quant_type, double_quant)
        where = f"case {case} blocksize {blocksize} numel {w.numel()} dq={double_quant}"
        assert torch.equal(ours.packed, packed.view(-1)), where
        absmax = state.absmax
        if double_quant:
            assert torch.equal(ours.state.offset, state.offset), where
            assert torch.equal(ours.state.nested_absmax, state.state2.absmax), where
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(ours.state.absmax, state.absmax), where
        expected = compute(packed.view(-1), absmax, state.code, blocksize, state.shape, dtype)
        # bit patterns, so that -0.0 and +0.0 count as different
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(dequantize(ours).view(bits), expected.view(bits)), where


def _float16_weight_with_two_blocks_at_the_max(g: torch.Generator, peak: float = FLOAT16_MAX) -> torch.Tensor:
    """(3, 64) float16: blocks 0 and 2 reach +-peak, block 1 a few hundred. At peak 65504 the centred absmax of the
    outer blocks scales to about 0.5, which the dynamic map rounds up, so their absmax decodes above 65504."""
    w = torch.randn(3, 64, generator=g) * 100
    w[0, int(torch.randint(64, (), generator=g))] = peak
    w[2, int(torch.randint(64, (), generator=g))] = -peak
    w[1, 0] = float(torch.empty(()).uniform_(200, 3000, generator=g))
    return w.half()


def test_double_quantized_float16_weight_that_would_decode_to_inf_is_refused(bnb_functional):
    # bitsandbytes quantizes it and decodes those blocks' largest values to +-Inf; we refuse it instead
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        w = _float16_weight_with_two_blocks_at_the_max(g)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True)
        assert not bool(torch.isfinite(bnb_functional.dequantize_4bit(packed, state)).all())
        with pytest.raises(ValueError, match=r"double-quantized weight decodes to values up to 655\d\d\S*, which "
                                             r"overflow float16; valid: .*or double_quant=False"):
            quantize(w, blocksize=64, double_quant=True)
        assert bool(torch.isfinite(quantize(w, blocksize=64, double_quant=False).dequantize()).all())


def test_double_quantized_float16_weight_with_a_margin_below_the_max_still_quantizes():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    w = (w / w.abs().amax(dim=1, keepdim=True) * 64000 * torch.rand(16, 1, generator=g).clamp(min=0.5)).half()
    assert bool(torch.isfinite(quantize(w, double_quant=True).dequantize()).all())


def test_triton_quantize_refuses_what_the_reference_refuses_near_the_float16_max():
    """The Triton quantizer accepted the weights above (its state decoded to +-Inf). Both quantizers must refuse the
    same draws with the same message and agree byte for byte on the others."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(5)
    outcomes = set()
    for peak in (FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX, 64000, 60000):
        w = _float16_weight_with_two_blocks_at_the_max(g, peak)
        try:
            ref, expected = quantize(w, 64, "nf4", True), None
        except ValueError as error:
            ref, expected = None, str(error)
        with use_kernels("triton"):
            if expected is None:
                q = quantize_dispatched(w.to(device))
                assert torch.equal(q.packed.cpu(), ref.packed) and torch.equal(q.state.absmax.cpu(), ref.state.absmax)
            else:
                with pytest.raises(ValueError) as refused:
                    quantize_dispatched(w.to(device))
                assert str(refused.value) == expected
        outcomes.add(expected is None)
    assert outcomes == {True, False}  # the draws cover both a refusal and an accepted weight


def _state_dict(dtype=torch.float32, double_quant=True, meta=None, raw_meta=None):
    """bitsandbytes entries of a fresh random (4, 64) weight, with `meta` fields set (or the JSON text replaced)."""
    sd = to_bnb_state_dict(quantize(torch.randn(4, 64).to(dtype), double_quant=double_quant), "weight")
    fields = {**json.loads(bytes(sd[META_KEY].tolist())), **(meta or {})}
    sd[META_KEY] = torch.tensor(list((raw_meta or json.dumps(fields)).encode()), dtype=torch.uint8)
    return sd


def test_state_whose_absmax_decodes_beyond_float16_is_refused():
    # finite everywhere, but 1e5 * code decodes to +-Inf in float16 (bitsandbytes returns the Inf)
    sd = _state_dict(torch.float16, double_quant=False)
    sd["weight.absmax"] = sd["weight.absmax"] * 1e5
    with pytest.raises(ValueError, match=r"weight.absmax decodes to values up to \S+, which overflow float16"):
        from_bnb_state_dict(sd, "weight")


def test_double_quantized_state_whose_offset_decodes_beyond_float16_is_refused():
    with pytest.raises(ValueError, match=r"weight.absmax decodes to values up to \S+, which overflow float16"):
        from_bnb_state_dict(_state_dict(torch.float16, meta={"nested_offset": 2.0**70}), "weight")


@pytest.mark.parametrize("offset_text", ["1e39", "-1e39", "1" + "0" * 400], ids=["1e39", "-1e39", "10**400"])
def test_nested_offset_beyond_float32_is_refused_by_name(offset_text):
    # 1e39 is a finite float64 that loaded as an Inf float32 offset; 10**400 (a JSON integer) raised OverflowError
    fields = json.loads(bytes(_state_dict()[META_KEY].tolist()))
    raw = json.dumps({**fields, "nested_offset": "OFFSET"}).replace('"OFFSET"', offset_text)
    with pytest.raises(ValueError, match=rf"{META_KEY}' has nested_offset -?1[^;]*; valid: a finite number within float32"):
        from_bnb_state_dict(_state_dict(raw_meta=raw), "weight")


@pytest.mark.parametrize("field,value", [("nested_blocksize", 256), ("nested_blocksize", "x"), ("nested_dtype", "float32")])
def test_nested_quant_state_field_without_nested_offset_is_refused(field, value):
    # the fields of double quantization without its offset: a quant_state that lost part of its nested fields
    with pytest.raises(ValueError, match=rf"weight has {field} in '{META_KEY}' but no nested_offset"):
        from_bnb_state_dict(_state_dict(double_quant=False, meta={field: value}), "weight")


def test_long_bad_quant_state_value_is_shortened_in_the_message():
    shape = [int(d) for d in np.random.default_rng(0).integers(1, 9, 20_000)] + [-1]
    with pytest.raises(ValueError, match=r"has shape \[\d.*\.\.\. \(\d+ characters\); valid: a list") as info:
        from_bnb_state_dict(_state_dict(meta={"shape": shape}), "weight")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("code", [[0.0] * 16, np.linspace(-1, 1, 16, dtype=np.float32)], ids=["list", "ndarray"])
def test_custom_codebook_that_is_not_a_tensor_is_refused_by_type(code):
    with pytest.raises(ValueError, match=rf"custom codebook must be \(16,\) float32 \(a torch.Tensor\), got "
                                         rf"{type(code).__name__}"):
        quantize(torch.randn(64), code=code)
