"""LoRA on a CUDA NF4 base (Triton dequantize / GEMV paths) against fp64 references. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_helpers import rel_err
from nf4lora.lora import LoraConfig, LoraLinear
from nf4lora.nf4.linear import NF4Linear

pytestmark = pytest.mark.gpu


def _layer(n: int, k: int, r: int) -> LoraLinear:
    torch.manual_seed(0)
    dense = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["p"], init_lora_weights=False)
    return LoraLinear(NF4Linear.from_linear(dense, compute_dtype=torch.bfloat16), "a", cfg)


def _reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 ``x @ W.T + b + s * x @ A.T @ B.T`` on the dequantized weight."""
    w = layer.base_layer.dequantized_weight(torch.float32).double()
    a, b = (p.detach().double() for p in (layer.lora_A["a"].weight, layer.lora_B["a"].weight))
    y = x.double() @ w.t() + layer.scaling["a"] * (x.double() @ a.t() @ b.t())
    return y + layer.base_layer.bias.double()


@pytest.mark.parametrize(("m", "n", "k"), [(4096, 1024, 4096), (300, 1000, 4160), (37, 4096, 11008)])
def test_gpu_fused_lora_on_nf4_matches_fp64_forward_and_every_gradient(m, n, k):
    layer = _layer(n, k, r=16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight]
    grads = torch.autograd.grad(y, [x, *params], dy)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (p.detach().double().requires_grad_() for p in params)
    w = layer.base_layer.dequantized_weight(torch.float32).double()
    y64 = x64 @ w.t() + layer.base_layer.bias.double() + layer.scaling["a"] * (x64 @ a64.t() @ b64.t())
    refs = torch.autograd.grad(y64, [x64, a64, b64], dy.double())
    # bf16 operands and outputs (2^-8 per rounding) with fp32 accumulation in every GEMM.
    assert rel_err(y, y64) < 1e-2
    for got, want in zip(grads, refs):
        assert rel_err(got, want) < 1e-2
    # A and B's gradients are written in fp32 by the GEMMs, not rounded to bf16 and cast back: only
    # the bf16 operands' rounding remains
    assert all(g.dtype == torch.float32 for g in grads[1:])
    assert max(rel_err(got, want) for got, want in zip(grads[1:], refs[1:])) < 4e-3


@pytest.mark.parametrize("m", [1, 7, 16, 17])
def test_gpu_inference_lora_on_nf4_uses_the_small_m_paths_and_matches_fp64(m):
    layer = _layer(4096, 4096, r=64).eval()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, _reference(layer, x)) < 1e-2  # bf16 output rounding, fp32 accumulation


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_gpu_adapter_initialisation_is_the_same_on_every_device(init):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["p"], init_lora_weights=init)
    layers = []
    for device in ("cpu", "cuda"):
        base = nn.Linear(64, 96, device=device)
        torch.manual_seed(0)
        layers.append(LoraLinear(base, "a", cfg))
    for name in ("lora_A", "lora_B"):
        on_cpu, on_gpu = (getattr(layer, name)["a"].weight for layer in layers)
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)
