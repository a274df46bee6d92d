import pytest
import torch
from torch import nn

from nf4lora.kernels import use_kernels
from nf4lora.nf4 import dequantize
from nf4lora.nf4.linear import NF4Linear


@pytest.fixture
def layer():
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    return dense, NF4Linear.from_linear(dense, blocksize=32)


def test_forward_equals_dense_layer_on_the_dequantized_weight(layer):
    dense, quantized = layer
    x = torch.randn(2, 5, 96)
    with use_kernels("reference"):
        y = quantized(x)
    # same operands in float32, so only summation order differs
    expected = x @ dequantize(quantized.weight).T + dense.bias
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_input_and_never_the_frozen_weight(layer):
    _, quantized = layer
    x = torch.randn(3, 96, requires_grad=True)
    with use_kernels("reference"):
        quantized(x).square().sum().backward()
    w = dequantize(quantized.weight)
    y = x.detach() @ w.T + quantized.bias
    torch.testing.assert_close(x.grad, (2 * y) @ w, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in quantized.parameters())


def test_state_dict_round_trip_uses_bitsandbytes_keys(layer):
    _, quantized = layer
    state = quantized.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_state.bitsandbytes__nf4"} <= set(state)
    fresh = NF4Linear.from_linear(nn.Linear(96, 40), blocksize=32)
    fresh.load_state_dict(state)
    assert torch.equal(dequantize(fresh.weight), dequantize(quantized.weight))
    assert torch.equal(fresh.bias, quantized.bias)


def test_loading_a_weight_of_another_shape_is_refused(layer):
    _, quantized = layer
    other = NF4Linear.from_linear(nn.Linear(64, 40))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: checkpoint \(40, 96\), model \(40, 64\)"):
        other.load_state_dict(quantized.state_dict())


def test_compute_dtype_governs_the_matmul_and_the_output_keeps_the_input_dtype(layer):
    dense, _ = layer
    quantized = NF4Linear.from_linear(dense.to(torch.bfloat16))
    x = torch.randn(4, 96)
    y = quantized(x)
    assert y.dtype == torch.float32  # as bitsandbytes' Linear4bit gives back its input's dtype
    assert torch.equal(y, quantized(x.bfloat16()).float())  # computed in bf16
    assert "nf4+dq, blocksize=64" in repr(quantized)


@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_group_equals_calling_each_layer(monkeypatch, with_bias):
    from nf4lora.kernels import gemv_nf4

    torch.manual_seed(0)
    layers = [NF4Linear.from_linear(nn.Linear(128, n, bias=with_bias)) for n in (40, 24)]
    launches = []
    real = gemv_nf4.fused_matmul_parts
    monkeypatch.setattr(gemv_nf4, "fused_matmul_parts", lambda *args: launches.append(1) or real(*args))
    x = torch.randn(1, 1, 128)
    with torch.no_grad(), use_kernels("triton"):
        grouped = NF4Linear.forward_group(layers, x)
        separate = [layer(x) for layer in layers]
    assert launches == ([] if with_bias else [1])  # biased layers take one launch each
    for a, b in zip(grouped, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantize_linears_replaces_every_linear_but_the_skipped():
    from nf4lora.nf4.linear import quantize_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 64, bias=False)))
    model.lm_head = nn.Linear(64, 10)
    x = torch.randn(3, 64)
    first = model[0]
    assert quantize_linears(model) is model
    assert isinstance(model[0], NF4Linear) and isinstance(model[2][0], NF4Linear) and type(model.lm_head) is nn.Linear
    expected = torch.nn.functional.linear(x, dequantize(model[0].weight), first.bias)
    torch.testing.assert_close(model[0](x), expected)
