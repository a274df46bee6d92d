"""Benchmark audit 10, on the CPU: subset result names, one-line CLI errors, result headers without ceilings, and
the training peer's peak memory with bitsandbytes' paged optimizer states."""

from __future__ import annotations

import importlib
import json
import types

import pytest
import torch

from benchmarks import common
from benchmarks import kernels as bench_kernels
from benchmarks import train as bench_train

FAKE_ENV = {"date": "2026-01-01T00:00:00+00:00", "git_sha": "abc", "packages": {"torch": "x"}, "gpu": {"name": "H200"}}


def test_kernels_run_on_fewer_shapes_does_not_overwrite_the_full_table(tmp_path, monkeypatch):
    # only --ops and --ms made a run a subset: one shape with every op wrote <date>_kernels_<gpu>, replacing the
    # full table of the same day
    pytest.importorskip("bitsandbytes")  # main imports it; imported with CUDA faked available, it would fail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_kernels, "environment", lambda extra_packages=(): FAKE_ENV)
    monkeypatch.setattr(bench_kernels, "device_ceilings", lambda: {"copy_gbs": 1.0, "bf16_matmul_tflops": 1.0})
    monkeypatch.setattr(bench_kernels, "bench_shape",
                        lambda N, K, *args: [{"op": "dequantize", "shape": f"{N}x{K}", "check": "ok"}])
    assert bench_kernels.main(["--shapes", "4096x4096", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-01-01_kernels-subset_h200.json",
                                                          "2026-01-01_kernels-subset_h200.md"]


def test_kernels_full_run_keeps_the_family_name():
    assert bench_kernels.result_family(bench_kernels.SHAPES, set(bench_kernels.OPS), bench_kernels.SMALL_MS) == "kernels"


@pytest.mark.parametrize("module, argv, bad", [
    ("kernels", ["--shapes", "4096"], "'4096'"),
    ("kernels", ["--ms", "1,0"], "'1,0'"),
    ("lora", ["--check-only", "--ranks", "16,x"], "'16,x'"),
    ("split_k", ["--chunks", "1024,"], "'1024,'"),
    ("split_k", ["--shapes", "4096x512", "--chunks", "1024,2048"], "4096x512"),  # no chunk fits: no best chunk
    ("grouped", ["--ms", "a"], "'a'"),
    ("decode_attention", ["--batch", "0"], "'0'"),
    ("layer_ops", ["--new-tokens", "0"], "'0'"),
    ("model", ["--device", "cuda", "--new-tokens", "0"], "'0'"),
    ("optim", ["--lora-r", "0"], "'0'"),
    ("train", ["--steps", "0"], "'0'"),
    ("train_backward_thread", ["--rounds", "-1"], "'-1'"),
])
def test_bad_cli_values_stop_with_one_line_naming_the_value(module, argv, bad, capsys):
    # they used to reach the GPU check, a traceback (int("x"), unpacking "4096") or a division by zero steps later
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert bad in last and "valid" in last


def test_results_header_names_no_ceiling_that_was_not_measured(tmp_path):
    # families that measure no ceiling (layer-ops, split-k) printed "measured copy bandwidth None GB/s"
    _, md = common.write_results("probe", [{"a": 1.0}], {}, FAKE_ENV, {}, ["a"], out_dir=tmp_path)
    assert "None" not in md.read_text() and "copy bandwidth" not in md.read_text()
    _, md = common.write_results("probe", [{"a": 1.0}], {}, FAKE_ENV, {"copy_gbs": 4274.4, "bf16_matmul_tflops": 672.2},
                                 ["a"], out_dir=tmp_path)
    assert "measured copy bandwidth 4274.4 GB/s, bf16 matmul 672.2 TFLOP/s." in md.read_text()


def test_peer_peak_memory_counts_bitsandbytes_paged_optimizer_states(monkeypatch):
    # PagedAdamW32bit keeps the states of tensors of >= 1e5 elements in CUDA managed memory, which
    # max_memory_allocated does not see: the r=64 peer's peak lacked its 1.19 GiB of states
    paged = [torch.zeros(2**20), torch.zeros(2**20)]
    for t in paged:
        t.is_paged = True
    optimizer = types.SimpleNamespace(state={
        "big": {"state1": paged[0], "state2": paged[1], "step": torch.tensor(3.0)},
        "small": {"state1": torch.zeros(10), "state2": torch.zeros(10), "step": 3},
    })
    assert bench_train.paged_state_bytes(optimizer) == 2 * 4 * 2**20
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    assert bench_train.peak_gib(torch.device("cuda"), 2**29) == 1.5
    assert bench_train.peak_gib(torch.device("cpu"), 2**29) is None


def test_decode_attention_run_fails_when_a_row_is_wrong(monkeypatch, tmp_path):
    # the row recorded our kernel's error but never judged it, so a wrong kernel still exited 0
    bench_attention = importlib.import_module("benchmarks.decode_attention")
    errors = iter([1e-3, 0.5])

    def fake_case(name, H, H_kv, D, B, L, copy_gbs):
        return {"model": name, "B": B, "L": L, "check": common.judge({}, {"rel_err": next(errors, 1e-3)})}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_attention, "bench_case", fake_case)
    monkeypatch.setattr(bench_attention, "environment", lambda: {})
    monkeypatch.setattr(bench_attention, "device_ceilings", lambda: {"copy_gbs": 1.0})
    monkeypatch.setattr(bench_attention, "write_results", lambda *args, **kwargs: None)
    assert bench_attention.main(["--batch", "1", "--out-dir", str(tmp_path)]) == 1
    errors = iter([])
    assert bench_attention.main(["--batch", "1", "--out-dir", str(tmp_path)]) == 0


def test_results_of_a_second_run_the_same_day_keep_the_first_as_run_n(tmp_path):
    # a second run of a family on one day overwrote the first run's files; a run rewriting its own table (after
    # every shape) keeps one pair of files
    def write(hour, value):
        env = {"date": f"2026-11-29T{hour}:00:00+00:00", "git_sha": "abc", "packages": {}, "gpu": {"name": "H200"}}
        common.write_results("fam_x", [{"a": value}], {}, env, {}, ["a"], out_dir=tmp_path)

    for hour, value in (("10", 1), ("10", 2), ("11", 3), ("12", 4)):
        write(hour, value)
    names = sorted(p.name for p in tmp_path.iterdir())
    runs = ("-run1", "-run2", "")
    assert names == [f"2026-11-29_fam_x{run}_h200.{ext}" for run in runs for ext in ("json", "md")]
    rows = {run: json.loads((tmp_path / f"2026-11-29_fam_x{run}_h200.json").read_text())["rows"] for run in runs}
    assert rows == {"-run1": [{"a": 2}], "-run2": [{"a": 3}], "": [{"a": 4}]}


def test_model_runs_on_fewer_layers_or_without_peers_are_named_as_a_subset():
    # a quick --layers 8 or --no-peers run wrote the family of the full measurement
    bench_model = importlib.import_module("benchmarks.model")
    full = bench_model.BenchConfig()
    assert bench_model.result_family(full) == "model"
    for change in ({"layers": 8}, {"peers": False}, {"new_tokens": 32}, {"hidden": 2048}):
        assert bench_model.result_family(bench_model.BenchConfig(**change)) == "model-subset"


def test_lora_runs_on_fewer_shapes_or_ranks_are_named_as_a_subset():
    bench_lora = importlib.import_module("benchmarks.lora")
    full = (bench_lora.SHAPES, bench_lora.RANKS, bench_lora.M)
    assert bench_lora.result_family(*full) == "lora"
    assert bench_lora.result_family(bench_lora.SHAPES[:1], bench_lora.RANKS, bench_lora.M) == "lora-subset"
    assert bench_lora.result_family(bench_lora.SHAPES, (16,), bench_lora.M) == "lora-subset"
    assert bench_lora.result_family(bench_lora.SHAPES, bench_lora.RANKS, 512) == "lora-subset"
