"""The benchmarks' check verdicts (benchmarks/common.py judge, used by kernels.py and grouped.py), on the CPU."""

from __future__ import annotations

import math

from benchmarks import common


def test_judge_passes_exact_matches_and_errors_within_tolerance():
    cell = common.judge({"exact==reference": True}, {"rel_err": 2.3e-3}, {"exact==bnb": False})
    assert cell == "ok: exact==reference True, rel_err 2.3e-03, exact==bnb False"


def test_judge_fails_nan_errors_beyond_tolerance_and_inexact_bytes():
    assert common.judge({}, {"rel_err": math.nan}).startswith("FAIL")
    assert common.judge({}, {"rel_err": 2 * common.REL_TOL}).startswith("FAIL")
    assert common.judge({"bytes==reference": False}, {}).startswith("FAIL")


def test_judge_reports_but_does_not_judge_the_peers_values():
    assert common.judge({}, {"rel_err": 1e-3}, {"bnb_rel_err": 0.5, "absmax==bnb": False}).startswith("ok")
