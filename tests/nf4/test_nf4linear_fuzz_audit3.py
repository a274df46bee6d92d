"""Fuzz audit of the NF4Linear module API against bitsandbytes' CPU Linear4bit: random layers' state dicts byte for
byte and both load directions, forward on every input dtype and shape, and quantize_linears on random module trees;
plus the inputs, constructor arguments and state-dict keys that used to be accepted silently."""

import copy
import random

import pytest
import torch
from torch import nn

from nf4lora.nf4 import dequantize, quantize
from nf4lora.nf4.linear import NF4Linear, quantize_linears

DTYPES = [torch.float32, torch.float16, torch.bfloat16]




def _random_layer_config(rng: random.Random) -> dict:
    """A random layer: odd sizes and rows that are not whole blocks included."""
    return dict(
        in_features=rng.choice([1, 3, 31, 64, 65, 96, 130, 256]),
        out_features=rng.choice([1, 2, 5, 16, 33]),
        blocksize=rng.choice([32, 64, 128, 256, 1024, 4096]),
        quant_type=rng.choice(["nf4", "fp4"]),
        double_quant=rng.random() < 0.5,
        dtype=rng.choice(DTYPES),
        bias=rng.random() < 0.5,
    )


def _dense(config: dict) -> nn.Linear:
    return nn.Linear(config["in_features"], config["out_features"], bias=config["bias"]).to(config["dtype"])


def _ours(dense: nn.Linear, config: dict) -> NF4Linear:
    return NF4Linear.from_linear(
        dense, blocksize=config["blocksize"], quant_type=config["quant_type"], double_quant=config["double_quant"]
    )


def _theirs(bnb, dense: nn.Linear, config: dict):
    """bitsandbytes' Linear4bit quantizing the same dense layer on the CPU."""
    layer = bnb.nn.Linear4bit(
        dense.in_features, dense.out_features, bias=dense.bias is not None, compute_dtype=config["dtype"],
        quant_type=config["quant_type"],
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type=config["quant_type"],
        compress_statistics=config["double_quant"], blocksize=config["blocksize"],
    )
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu").eval()
    layer.support_avx512bf16_for_cpu = False  # its repacked CPU weight refuses odd shapes
    return layer


def _bnb_decode(bnb, state_dict: dict, prefix: str = "weight") -> torch.Tensor:
    """The weight bitsandbytes decodes from Linear4bit entries (its pure-PyTorch decoder: the C++ CPU one indexes
    absmax per row, wrong where a row is not a whole number of blocks; nf4/blockwise.py's docstring)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    stats = {k.removeprefix(prefix + "."): v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    param = bnb.nn.Params4bit.from_prequantized(state_dict[prefix], stats, requires_grad=False, device="cpu")
    state = param.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
    return _dequantize_4bit_compute(param.data.reshape(-1), absmax.float(), code, state.blocksize,
                                    list(state.shape), state.dtype)


def test_random_layers_state_dicts_equal_bitsandbytes_and_load_both_ways(bnb, rng):
    for _ in range(25):
        config = _random_layer_config(rng)
        dense = _dense(config)
        ours, theirs = _ours(dense, config), _theirs(bnb, dense, config)
        our_state, their_state = ours.state_dict(), theirs.state_dict()
        assert sorted(our_state) == sorted(their_state), config
        for key, value in their_state.items():
            assert our_state[key].dtype == value.dtype and torch.equal(our_state[key], value), (config, key)
        assert torch.equal(_bnb_decode(bnb, our_state), dequantize(ours.weight)), config
        other = dict(config, blocksize=64, quant_type="nf4", double_quant=not config["double_quant"])
        fresh = _ours(_dense(other), other)
        fresh.load_state_dict(their_state)
        assert torch.equal(dequantize(fresh.weight), dequantize(ours.weight)), config


def test_random_forwards_equal_the_dense_layer_and_bitsandbytes(bnb, rng):
    for _ in range(25):
        config = _random_layer_config(rng)
        dense = _dense(config)
        ours, theirs = _ours(dense, config), _theirs(bnb, dense, config)
        k = config["in_features"]
        x = torch.randn(rng.choice([(k,), (3, k), (2, 4, k), (0, k), (2, 0, k)])).to(rng.choice(DTYPES))
        with torch.no_grad():
            y = ours(x)
            y_bnb = theirs(x)
        c = ours.compute_dtype
        bias = None if ours.bias is None else ours.bias.to(c)
        expected = nn.functional.linear(x.to(c), dequantize(ours.weight, c), bias).to(x.dtype)
        assert y.dtype == y_bnb.dtype == x.dtype and y.shape == y_bnb.shape == expected.shape, config
        assert torch.equal(y, expected), config  # the same operands through the same F.linear
        if k % config["blocksize"] == 0:  # elsewhere bitsandbytes' CPU decoder is wrong (_bnb_decode)
            tol = 1e-4 if c == torch.float32 else 5e-2
            torch.testing.assert_close(y.float(), y_bnb.float(), rtol=tol, atol=tol * k**0.5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input_is_refused_by_dtype(dtype):
    # it was cast to the compute dtype and the output back to the input's: an integer input gave a truncated
    # integer output, where nn.Linear raises
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    x = torch.ones(2, 64, dtype=dtype)
    with pytest.raises(TypeError, match=rf"NF4Linear input must be a floating-point tensor, got {dtype}; valid: "):
        layer(x)
    with pytest.raises(TypeError, match=rf"got {dtype}"):
        NF4Linear.forward_group([layer, NF4Linear.from_linear(nn.Linear(64, 4, bias=False))], x)


def test_float64_input_is_computed_in_the_compute_dtype():
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(layer(x), layer(x.float()).double())


@pytest.mark.parametrize(
    ("weight", "bias", "error", "message"),
    [
        (torch.randn(8, 64), None, TypeError, r"NF4Linear needs a QuantizedTensor weight, got Tensor; use NF4Linear"),
        (None, torch.arange(8), TypeError, r"bias has dtype torch.int64; valid: a floating-point dtype"),
        (None, [0.0] * 8, TypeError, r"bias must be a torch.Tensor or None, got list"),
        (None, torch.zeros(8, 1), ValueError, r"bias must have shape \(8,\), got \(8, 1\)"),
    ],
)
def test_bad_constructor_arguments_are_refused_in_one_line(weight, bias, error, message):
    # a dense weight failed with AttributeError 'Tensor' object has no attribute 'state', a list bias with
    # AttributeError, and an integer bias was silently cast
    weight = quantize(torch.randn(8, 64)) if weight is None else weight
    with pytest.raises(error, match=message):
        NF4Linear(weight, bias)


def test_compute_dtype_given_as_a_string_is_shown_as_one():
    # "compute_dtype bfloat16 is not supported; valid: ..., bfloat16" read as a contradiction
    with pytest.raises(TypeError, match=r"compute_dtype 'bfloat16' is not supported; valid: float32, float16"):
        NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype="bfloat16")


def test_unknown_weight_entry_is_an_unexpected_key():
    # every weight.* key was taken as part of the 4-bit state and unknown ones were dropped without a word, so a
    # misspelt or foreign entry loaded under strict=True
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    state = {**layer.state_dict(), "weight.absmax2": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.absmax2"'):
        copy.deepcopy(layer).load_state_dict(state)
    assert copy.deepcopy(layer).load_state_dict(state, strict=False).unexpected_keys == ["weight.absmax2"]


def test_load_with_assign_keeps_the_checkpoint_weight_off_the_meta_device():
    # the loaded weight was moved to the module's device, so a module on "meta" loaded with assign=True (the way
    # to fill a model built without memory) kept a weight with no data while its bias was filled
    source = NF4Linear.from_linear(nn.Linear(64, 8))
    target = copy.deepcopy(source).to("meta")
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.weight.device.type == "cpu" and target.bias.device.type == "cpu"
    x = torch.randn(2, 64)
    assert torch.equal(target(x), source(x))


def test_skip_given_as_one_name_skips_only_that_name():
    # `name not in "lm_head"` is a substring test: a layer named "head" (or "m", "_h") was skipped too
    model = nn.ModuleDict({"lm_head": nn.Linear(4, 4), "head": nn.Linear(4, 4)})
    quantize_linears(model, skip="lm_head")
    assert type(model["lm_head"]) is nn.Linear and isinstance(model["head"], NF4Linear)


def test_bare_linear_comes_back_quantized():
    # it has no parent to be replaced in, and came back as the same dense nn.Linear without a word
    dense = nn.Linear(64, 8)
    layer = quantize_linears(dense, blocksize=32)
    assert isinstance(layer, NF4Linear) and layer.weight.state.blocksize == 32
    assert torch.equal(dequantize(layer.weight), dequantize(quantize(dense.weight, 32)))


def test_multihead_attention_keeps_working():
    # its out_proj (NonDynamicallyQuantizableLinear, a subclass of nn.Linear) was replaced, and MultiheadAttention,
    # which passes out_proj.weight to F.multi_head_attention_forward, failed with a TypeError about QuantizedTensor
    model = nn.Sequential(nn.Linear(16, 16))
    model.attn = nn.MultiheadAttention(16, 2)
    x = torch.randn(3, 2, 16)
    expected = model.attn(x, x, x)[0]
    quantize_linears(model)
    assert isinstance(model[0], NF4Linear)
    torch.testing.assert_close(model.attn(x, x, x)[0], expected, rtol=0, atol=0)


NAMES = ["lm_head", "head", "q_proj", "0", "mlp", "out_proj"]


def _random_tree(rng: random.Random, depth: int, linears: list[nn.Linear]) -> nn.Module:
    """A random module tree: containers, activations, fresh linears and linears seen before (shared modules)."""
    node = nn.Module()
    for name in rng.sample(NAMES, rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.3 and depth > 0:
            child = _random_tree(rng, depth - 1, linears)
        elif roll < 0.45 and linears:
            child = rng.choice(linears)
        elif roll < 0.55:
            child = nn.ReLU()
        else:
            child = nn.Linear(rng.choice([8, 32]), rng.choice([4, 8]), bias=rng.random() < 0.5)
            linears.append(child)
        node.add_module(name, child)
    return node


def _slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, name, child), shared children once per parent they sit in."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]


def test_quantize_linears_on_random_trees_replaces_exactly_the_unskipped_linears(rng):
    # a linear shared by two parents became two NF4Linear copies: twice the memory, and no longer one module
    for _ in range(30):
        model = _random_tree(rng, depth=3, linears=[])
        skip = tuple(rng.sample(NAMES, rng.randint(0, 2)))
        before = _slots(model)
        quantize_linears(model, skip=skip, blocksize=32)
        replaced: dict[nn.Linear, NF4Linear] = {}
        for parent, name, child in before:
            now = getattr(parent, name)
            if type(child) is nn.Linear and name not in skip:
                assert isinstance(now, NF4Linear), (name, skip)
                assert replaced.setdefault(child, now) is now, f"shared {name} quantized twice"
                assert torch.equal(dequantize(now.weight), dequantize(quantize(child.weight, 32)))
            else:
                assert now is child, (name, skip)


def test_autocast_compile_and_inference_mode_give_the_dense_layers_numbers():
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    weight = dequantize(layer.weight)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = nn.functional.linear(x, weight, layer.bias).float()  # bf16 math, then the input's dtype
        assert torch.equal(layer(x), expected)
    with torch.inference_mode():
        assert torch.equal(layer(x), nn.functional.linear(x, weight, layer.bias))
    assert torch.equal(torch.compile(layer, backend="eager")(x), layer(x))


def test_a_dense_checkpoint_weight_is_named_as_dense():
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"found 0; weight is a dense torch.float32 weight"):
        layer.load_state_dict(torch.nn.Linear(64, 8).state_dict())


def test_forward_group_of_no_layers_is_empty():
    assert NF4Linear.forward_group([], torch.randn(2, 64)) == []
