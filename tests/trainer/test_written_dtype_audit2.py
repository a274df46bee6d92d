"""merge and quantize write the tensors they leave unquantized (embeddings, norms, output head) in one dtype rule:
--dtype, where auto is bf16 on every device, and a 4-bit checkpoint records that dtype as its compute dtype."""

import json

import pytest
from safetensors import safe_open

from nf4lora.trainer.cli import main


@pytest.fixture
def adapter(trained_run):
    return trained_run


def unquantized_dtypes(checkpoint):
    """{safetensors dtype} of the embeddings, norms and head, and the compute dtype config.json records (or None)."""
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()
                  if key.endswith(("embed_tokens.weight", "norm.weight", "lm_head.weight"))}
    config = json.loads((checkpoint / "config.json").read_text())
    return dtypes, config.get("quantization_config", {}).get("bnb_4bit_compute_dtype")


@pytest.mark.filterwarnings("ignore:merge_and_unload\\(requantize=True\\)")
@pytest.mark.parametrize(("dtype", "stored", "compute"), [("auto", "BF16", "bfloat16"), ("bf16", "BF16", "bfloat16"),
                                                         ("fp32", "F32", "float32")])
def test_merge_to_nf4_and_quantize_store_the_same_dtype_on_the_cpu(tmp_path, tiny_model_dir, adapter, dtype, stored,
                                                                   compute):
    flags = ["--model", str(tiny_model_dir), "--dtype", dtype, "--device", "cpu"]
    assert main(["merge", *flags, "--adapter", str(adapter), "--quantize", "nf4", "--out", str(tmp_path / "m")]) == 0
    assert main(["quantize", *flags, "--out", str(tmp_path / "q")]) == 0
    assert unquantized_dtypes(tmp_path / "m") == unquantized_dtypes(tmp_path / "q") == ({stored}, compute)


@pytest.mark.parametrize(("dtype", "stored"), [("auto", "BF16"), ("fp32", "F32")])
def test_a_dense_merge_stores_the_dtype_asked_for(tmp_path, tiny_model_dir, adapter, dtype, stored):
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--dtype", dtype, "--device",
                 "cpu", "--out", str(tmp_path / "m")]) == 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {stored}
