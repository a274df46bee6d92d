"""Edge cases found in an audit: argument types, autograd, overflow, custom codebooks, malformed bitsandbytes states."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from nf4lora.nf4 import quantize
from nf4lora.nf4.linear import NF4Linear
from nf4lora.nf4.state_dict import from_bnb_state_dict, to_bnb_state_dict

META_KEY = "weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("blocksize", [64.0, True])
def test_non_integer_blocksize_is_refused_by_name(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize {blocksize!r} is not supported; valid: powers of two 32"):
        quantize(torch.randn(128), blocksize=blocksize)


def test_numpy_integer_blocksize_is_recorded_as_a_python_int():
    q = quantize(torch.randn(4, 64), blocksize=np.int64(32))
    assert type(q.state.blocksize) is int
    assert from_bnb_state_dict(to_bnb_state_dict(q)).state.blocksize == 32  # the JSON entry can be written


@pytest.mark.parametrize("w", [np.ones(64, dtype=np.float32), [1.0] * 64])
def test_non_tensor_input_names_its_type(w):
    with pytest.raises(TypeError, match=rf"cannot quantize weight of type {type(w).__name__}; valid: torch.Tensor"):
        quantize(w)


def test_quantizing_a_parameter_keeps_no_autograd_graph():
    weight = nn.Parameter(torch.randn(32, 64))
    for double_quant in (False, True):
        state = quantize(weight, double_quant=double_quant).state
        for name, t in state.tensors().items():
            assert not t.requires_grad and t.grad_fn is None, (double_quant, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_quant_refuses_absmax_whose_mean_overflows(dtype):
    w = torch.randn(256).abs().add(3.0).mul(1e38).clamp(max=3.3e38).to(dtype)  # every absmax near float32's max
    assert bool(torch.isfinite(quantize(w, double_quant=False).dequantize()).all())
    with pytest.raises(ValueError, match=r"double quantization.*overflows float32.*double_quant=False"):
        quantize(w, double_quant=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -2.0])
def test_custom_codebook_outside_unit_range_is_refused(bad):
    code = torch.linspace(-1, 1, 16)
    code[torch.randint(16, ()).item()] = bad
    with pytest.raises(ValueError, match=r"custom codebook values must be finite and in \[-1, 1\]"):
        quantize(torch.randn(64), code=code)


def test_compute_dtype_is_checked_when_the_layer_is_built():
    with pytest.raises(TypeError, match=r"compute_dtype torch.float64 is not supported; valid: float32, float16"):
        NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float64)


def _state_dict(double_quant=True, meta=None, entries=None):
    """A fresh bitsandbytes state dict of a random (16, 64) weight, with `meta` fields and `entries` replaced."""
    sd = to_bnb_state_dict(quantize(torch.randn(16, 64), double_quant=double_quant), "weight")
    fields = json.loads(bytes(sd[META_KEY].tolist()))
    fields.update(meta or {})
    sd[META_KEY] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    sd.update(entries or {})
    return sd


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"blocksize": 0}, r"blocksize 0; valid: 32, 64"),
        ({"blocksize": 48}, r"blocksize 48; valid: 32, 64"),
        ({"blocksize": 64.5}, r"blocksize 64.5; valid: 32, 64"),
        ({"blocksize": "64"}, r"blocksize '64'; valid: 32, 64"),
        ({"nested_blocksize": 0}, r"nested_blocksize 0; valid: 32, 64"),
        ({"nested_blocksize": "x"}, r"nested_blocksize 'x'; valid: 32, 64"),
        ({"shape": [-16, -64]}, r"shape \[-16, -64\]; valid: a list of non-negative integers"),
        ({"shape": [True, 1024]}, r"shape \[True, 1024\]; valid: a list of non-negative integers"),
        ({"shape": [2**62, 2**62]}, r"shape \[\d+, \d+\]; valid: a list of non-negative integers"),
        ({"dtype": "float64"}, r"dtype 'float64'; valid: float32, float16, bfloat16"),
        ({"dtype": ["float32"]}, r"dtype \['float32'\]; valid: float32, float16, bfloat16"),
        ({"nested_offset": "abc"}, r"nested_offset 'abc'; valid: a finite number"),
        ({"nested_offset": None}, r"nested_offset None; valid: a finite number"),
        ({"nested_offset": float("nan")}, r"nested_offset nan; valid: a finite number"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_bad_quant_state_field_is_refused_by_name(meta, message):
    with pytest.raises(ValueError, match=rf"{META_KEY}' has {message}"):
        from_bnb_state_dict(_state_dict(meta=meta), "weight")


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000, b"[1, 2]", b'"text"', b"\xff{}", torch.zeros(2, 8, dtype=torch.uint8),
     torch.tensor(list(b"{}"), dtype=torch.int64)],
    ids=["deeply nested", "a list", "a string", "not UTF-8", "2-D", "int64"],
)
def test_garbage_quant_state_entry_is_refused(raw):
    entry = torch.tensor(list(raw), dtype=torch.uint8) if isinstance(raw, bytes) else raw
    with pytest.raises(ValueError, match=rf"corrupt bitsandbytes quant state in '{META_KEY}'"):
        from_bnb_state_dict(_state_dict(entries={META_KEY: entry}), "weight")


@pytest.mark.parametrize("fields,missing", [({}, "quant_type"), ({"quant_type": "nf4"}, "blocksize"),
                                            ({"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}, "shape")])
def test_missing_quant_state_field_is_named(fields, missing):
    entry = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"{META_KEY}' has no {missing}; valid: "):
        from_bnb_state_dict(_state_dict(entries={META_KEY: entry}), "weight")


def test_quant_type_that_contradicts_its_key_is_refused():
    with pytest.raises(ValueError, match=rf"{META_KEY}' has quant_type 'fp4'; valid: 'nf4', as its key says"):
        from_bnb_state_dict(_state_dict(meta={"quant_type": "fp4"}), "weight")


def test_quant_state_entry_that_is_not_a_tensor_is_refused():
    sd = _state_dict()
    sd[META_KEY] = bytes(sd[META_KEY].tolist())
    with pytest.raises(ValueError, match=rf"corrupt bitsandbytes quant state in '{META_KEY}'"):
        from_bnb_state_dict(sd, "weight")


def _non_finite_copy(t: torch.Tensor) -> torch.Tensor:
    bad = t.clone()
    bad[torch.randint(t.numel(), ()).item()] = float(np.random.choice([np.nan, np.inf, -np.inf]))
    return bad


@pytest.mark.parametrize("double_quant,key", [(False, "absmax"), (False, "quant_map"), (True, "quant_map"),
                                              (True, "nested_absmax"), (True, "nested_quant_map")])
def test_non_finite_state_tensor_is_refused(double_quant, key):
    sd = _state_dict(double_quant)
    sd[f"weight.{key}"] = _non_finite_copy(sd[f"weight.{key}"])
    with pytest.raises(ValueError, match=rf"weight.{key} has non-finite values"):
        from_bnb_state_dict(sd, "weight")


def test_negative_absmax_is_refused():
    sd = _state_dict(double_quant=False)
    sd["weight.absmax"][torch.randint(16, ()).item()] *= -1
    with pytest.raises(ValueError, match=r"weight.absmax has negative values"):
        from_bnb_state_dict(sd, "weight")


@pytest.mark.parametrize("key,value", [("nested_absmax", torch.ones(1, dtype=torch.int64)),
                                       ("nested_quant_map", torch.arange(256))])
def test_nested_tensor_of_wrong_dtype_is_refused(key, value):
    n = value.numel()
    with pytest.raises(ValueError, match=rf"weight.{key} must be \({n},\) float32, got \({n},\) torch.int64"):
        from_bnb_state_dict(_state_dict(entries={f"weight.{key}": value}), "weight")


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map"])
def test_state_entry_that_is_not_a_tensor_is_refused(key):
    sd = _state_dict()
    sd[key] = sd[key].tolist()
    with pytest.raises(ValueError, match=rf"{key} must be a torch.Tensor, got list"):
        from_bnb_state_dict(sd, "weight")
