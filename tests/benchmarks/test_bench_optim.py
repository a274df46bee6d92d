"""benchmarks/optim.py's checks and ratio columns, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import optim as bench_optim


def test_scale_rel_err_is_nan_when_a_later_tensor_holds_nan():
    # builtin max() over per-tensor errors kept the first tensor's 0.0 and dropped the second's NaN
    ref = [torch.ones(3), torch.ones(3)]
    ours = [torch.ones(3), torch.tensor([1.0, math.nan, 1.0])]
    assert math.isnan(bench_optim.scale_rel_err(ours, ref))


def test_torch_fused_check_fails_on_nan_parameters():
    ref = [torch.ones(3), torch.ones(3)]
    ours = [torch.ones(3), torch.tensor([1.0, math.nan, 1.0])]
    assert bench_optim.check("torch_fused", 32, ours, {32: ref}).startswith("FAIL")


def test_scale_rel_err_is_the_largest_difference_over_the_largest_reference():
    ref = [torch.tensor([1.0, -4.0]), torch.tensor([2.0])]
    ours = [torch.tensor([1.5, -4.0]), torch.tensor([2.25])]
    assert bench_optim.scale_rel_err(ours, ref) == pytest.approx(0.5 / 4.0)


def test_ratio_columns_put_this_row_over_the_peer():
    rows = [
        {"optimizer": "torch_fused", "bits": 32, "step_ms": 2.0},
        {"optimizer": "adamw32", "bits": 32, "step_ms": 1.0},
        {"optimizer": "adamw8", "bits": 8, "step_ms": 3.0},
        {"optimizer": "paged8_1/8", "bits": 8, "step_ms": 6.0, "copy_floor_ms": 12.0},
        {"optimizer": "bnb_paged8", "bits": 8, "check": "peer error"},  # untimed: no ratios
    ]
    bench_optim.add_ratios(rows)
    assert rows[1]["this/torch_fused"] == 0.5 and rows[1]["this/adamw"] == 1.0
    assert rows[3]["this/adamw"] == 2.0 and rows[3]["this/copy_floor"] == 0.5
    assert "this/torch_fused" not in rows[4]
    assert {"this/torch_fused", "this/adamw", "this/copy_floor"} <= set(bench_optim.COLUMNS)
