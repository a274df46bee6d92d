"""benchmarks/model.py on a tiny random checkpoint on the CPU: decode floors per system, NaN-proof logits checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import model as bench_model
from nf4lora.model import load_model, model_nbytes

TINY = dict(layers=1, hidden=128, intermediate=256, vocab=512, heads=1, kv_heads=1, prompt_tokens=4, new_tokens=2,
            prefill_tokens=8, repeats=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[bench_model.BenchConfig, str]:
    cfg = bench_model.BenchConfig(**TINY, ckpt_dir=str(tmp_path_factory.mktemp("ckpt")))
    path, _ = bench_model.write_random_checkpoint(cfg, "cpu")
    return cfg, path


def _transformers(path: str, quantized: bool):
    transformers = pytest.importorskip("transformers")
    kwargs = {}
    if quantized:
        pytest.importorskip("bitsandbytes")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu", **kwargs)


def test_decode_floor_of_a_bf16_model_is_its_dense_weights(tiny_checkpoint):
    # the floor used to be our NF4 model's for every row: the bf16 row's decode/floor was 3.7x too high at 7B
    _, path = tiny_checkpoint
    dense = _transformers(path, quantized=False)
    weights = sum(p.nbytes for name, p in dense.named_parameters() if "embed_tokens" not in name)
    buffers = sum(b.nbytes for b in dense.buffers())
    assert bench_model.decode_floor_bytes(dense) == weights + buffers


def test_decode_floor_of_bitsandbytes_4bit_counts_its_quant_states_like_ours(tiny_checkpoint):
    _, path = tiny_checkpoint
    ours = load_model(path, quantization="nf4", dtype=torch.bfloat16, device="cpu", double_quant=True)
    ours_floor = bench_model.decode_floor_bytes(ours)
    assert ours_floor == model_nbytes(ours) - ours.model.embed_tokens.weight.nbytes
    bnb_floor = bench_model.decode_floor_bytes(_transformers(path, quantized=True))
    # same packed codes, absmax and nested absmax; they differ only in rope buffers and 4-byte offsets. Without
    # bitsandbytes' states (not parameters) the 4-bit model would come out about 3% (its absmax) lighter.
    assert abs(bnb_floor - ours_floor) < 1024


def test_decode_over_floor_divides_by_each_rows_own_floor():
    rows = [{"system": "nf4lora NF4 (CUDA graph)", "decode_ms_tok": 3.0, "floor_bytes": 1_000_000_000},
            {"system": "transformers bf16", "decode_ms_tok": 8.0, "floor_bytes": 4_000_000_000}]
    bench_model.derive_columns(rows, copy_gbs=1000.0)  # 1 GB reads in 1 ms
    assert [r["decode/floor"] for r in rows] == [3.0, 2.0]


def test_nan_triton_logits_stop_the_benchmark(tiny_checkpoint, monkeypatch):
    cfg, path = tiny_checkpoint
    monkeypatch.setattr(bench_model, "_rel", lambda a, b: math.nan)
    prompt = torch.randint(3, cfg.vocab, (1, cfg.prompt_tokens))
    with pytest.raises(AssertionError, match="Triton vs reference"):
        bench_model.bench_ours(cfg, path, "cpu", prompt, prompt, [], {})


def test_nan_logits_against_bitsandbytes_flag_our_row(tiny_checkpoint, tmp_path, monkeypatch):
    cfg, _ = tiny_checkpoint

    def nan_peer(cfg, path, device, prompt, long_prompt, rows, checks, quantized, ours_logits):
        if quantized:
            checks["ours_vs_bnb_logits_rel"] = math.nan

    monkeypatch.setattr(bench_model, "bench_transformers", nan_peer)
    argv = ["--device", "cpu", "--ckpt-dir", cfg.ckpt_dir, "--out", str(tmp_path), "--layers", "1",
            "--hidden", "128", "--intermediate", "256", "--vocab", "512", "--prefill-tokens", "8", "--new-tokens", "2"]
    assert bench_model.main(argv) == 0
    (result,) = tmp_path.glob("*_model-subset_*.json")  # a 1-layer run is a subset
    assert json.loads(result.read_text())["rows"][0]["check"].startswith("logits differ from bnb")
