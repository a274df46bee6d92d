"""benchmarks/lora.py's check against peft, on fake peers on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import lora as bench_lora


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a broken backward that leaves the output intact."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.nan)


def _check_with_unfused(unfused_weight) -> float:
    """bench_lora.check on fake peers: peft and ours are F.linear on a random w, the unfused path uses
    ``unfused_weight(w)``."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    peers = {
        "peft": (lambda x: F.linear(x, w), [w]),
        "ours": (lambda x: F.linear(x, w), [w]),
        "ours_unfused": (lambda x: F.linear(x, unfused_weight(w)), [w]),
    }
    x = torch.randn(2, 4, requires_grad=True)
    return bench_lora.check(peers, x, torch.randn(2, 3))


def test_check_returns_nan_when_the_last_gradient_is_nan():
    # builtin max() keeps its first operand when the other is NaN: the NaN weight gradient of the unfused path,
    # compared last, used to vanish and the check passed at 0.0
    assert math.isnan(_check_with_unfused(_NanGrad.apply))


def test_check_is_the_largest_relative_error_over_output_and_gradients():
    # y, grad_x and grad_w all 1% off
    assert _check_with_unfused(lambda w: 1.01 * w) == pytest.approx(0.01, rel=1e-4)
