"""benchmarks/kernels.py's check verdicts, on the CPU."""

from __future__ import annotations

import math

from benchmarks import kernels as bench_kernels


def test_judge_passes_exact_matches_and_errors_within_tolerance():
    cell = bench_kernels.judge({"exact==reference": True}, {"rel_err": 2.3e-3}, {"exact==bnb": False})
    assert cell == "ok: exact==reference True, rel_err 2.3e-03, exact==bnb False"


def test_judge_fails_nan_errors_beyond_tolerance_and_inexact_bytes():
    assert bench_kernels.judge({}, {"rel_err": math.nan}).startswith("FAIL")
    assert bench_kernels.judge({}, {"rel_err": 2 * bench_kernels.REL_TOL}).startswith("FAIL")
    assert bench_kernels.judge({"bytes==reference": False}, {}).startswith("FAIL")


def test_judge_reports_but_does_not_judge_the_peers_values():
    assert bench_kernels.judge({}, {"rel_err": 1e-3}, {"bnb_rel_err": 0.5, "absmax==bnb": False}).startswith("ok")
