"""LoRA layers under ``torch.autocast`` (as HF Trainer's bf16=True runs them): forward and backward work on fp32
bases, stay close to the run without autocast, and give the fp32 adapter weights fp32 gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_helpers import rel_err
from nf4lora.lora import LoraConfig, LoraLinear
from nf4lora.lora.functional import lora_delta_weight
from nf4lora.nf4.linear import NF4Linear

# One bf16 layer (K = 64): 8 mantissa bits, a few roundings per output; observed <= 1e-2, bf16's usual bound.
BF16_REL = 2e-2

ADAPTERS = {
    "lora": [{}],
    "dropout": [{"lora_dropout": 0.1}],
    "two-adapters": [{}, {}],
    "lora-then-dora": [{}, {"use_dora": True}],
    "dora": [{"use_dora": True}],
}


def _layer(base_kind: str, dtype: torch.dtype, adapters: list[dict]) -> LoraLinear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    base = linear.to(dtype) if base_kind == "linear" else NF4Linear.from_linear(linear, compute_dtype=dtype)
    base.requires_grad_(False)
    layer = None
    for i, spec in enumerate(adapters):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, **spec)
        if layer is None:
            layer = LoraLinear(base, f"a{i}", config)
        else:
            layer.add_adapter(f"a{i}", config)
    layer.active_adapters = [f"a{i}" for i in range(len(adapters))]
    return layer.train()


def _run(layer: LoraLinear, x_dtype: torch.dtype, autocast: bool, grad: bool = True) -> dict[str, torch.Tensor]:
    """Output and every gradient (x's and the trainable parameters') of one step; dropout masks seeded alike."""
    layer.zero_grad(set_to_none=True)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(x_dtype).requires_grad_()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
        y = layer(x)
    out = {"y": y}
    if grad:
        (y.float() * torch.linspace(-1, 1, 24)).sum().backward()
        out["x"] = x.grad
        for name, p in layer.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32, name
                out[name] = p.grad
    return out


@pytest.mark.parametrize("adapters", list(ADAPTERS), ids=list(ADAPTERS))
@pytest.mark.parametrize("base_kind, x_dtype", [("linear", torch.float32), ("nf4", torch.float32),
                                                 ("nf4", torch.bfloat16)])
def test_an_fp32_base_trains_under_autocast_close_to_the_fp32_run(base_kind, x_dtype, adapters):
    layer = _layer(base_kind, torch.float32, ADAPTERS[adapters])
    plain, cast = _run(layer, x_dtype, False), _run(layer, x_dtype, True)
    assert plain.keys() == cast.keys()
    for name in plain:
        assert rel_err(cast[name], plain[name]) < BF16_REL, name


@pytest.mark.parametrize("base_kind", ["linear", "nf4"])
def test_inference_on_an_fp32_base_under_autocast_gives_the_base_layers_dtype(base_kind):
    layer = _layer(base_kind, torch.float32, ADAPTERS["two-adapters"]).eval()
    plain, cast = _run(layer, torch.float32, False, grad=False), _run(layer, torch.float32, True, grad=False)
    # as the bare base layer under autocast: bf16 from nn.Linear, the input's dtype from NF4Linear (Linear4bit's rule)
    assert cast["y"].dtype == (torch.bfloat16 if base_kind == "linear" else torch.float32)
    assert rel_err(cast["y"], plain["y"]) < BF16_REL


@pytest.mark.parametrize("adapters", ["dora", "lora-then-dora"])
@pytest.mark.parametrize("base_kind", ["linear", "nf4"])
def test_a_bf16_layer_with_dora_is_unchanged_by_autocast(base_kind, adapters):
    # every matmul is bf16 already; only DoRA's fp32 weight norm could change, and it must not be rounded to bf16
    layer = _layer(base_kind, torch.bfloat16, ADAPTERS[adapters])
    plain, cast = _run(layer, torch.bfloat16, False), _run(layer, torch.bfloat16, True)
    for name in plain:
        torch.testing.assert_close(cast[name], plain[name], rtol=0, atol=0, msg=name)


def test_lora_delta_weight_stays_fp32_under_autocast():
    a, b = torch.randn(4, 64), torch.randn(24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = lora_delta_weight(a, b, 2.0)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, lora_delta_weight(a, b, 2.0), rtol=0, atol=0)
