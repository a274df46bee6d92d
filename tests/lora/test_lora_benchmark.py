"""benchmarks/lora.py runs its correctness checks (ours vs peft on bitsandbytes) on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "lora.py"


def test_lora_benchmark_check_only_passes_on_small_ragged_shapes(capsys):
    spec = importlib.util.spec_from_file_location("lora_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check-only", "--shapes", "72x136", "--ranks", "4", "--m", "19"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == "lora-subset" and summary["checks_ok"] is True
