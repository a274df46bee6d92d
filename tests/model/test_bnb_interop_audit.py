"""Audit of the transformers + bitsandbytes 4-bit interop matrix, both directions, on the CPU: save_quantized ->
`from_pretrained`, transformers' 4-bit `save_pretrained` -> load_model, and the config.json fields between them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.model import load_model, save_quantized
from nf4lora.nf4 import QuantizedTensor

from .conftest import hf_model, rel_err
from .test_loading import NF4_REL, _ids
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

# in_features a multiple of every blocksize tried: bitsandbytes' CPU dequantizer indexes absmax per row, so a row
# that is not a whole number of blocks decodes wrongly there (nf4/blockwise.py)
WIDE = dict(hidden_size=256, intermediate_size=512, num_key_value_heads=4, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """{tie_word_embeddings: directory} of transformers-saved fp32 checkpoints with WIDE dimensions."""
    root = tmp_path_factory.mktemp("wide")
    for tied in (False, True):
        hf_model(tie_word_embeddings=tied, **WIDE).save_pretrained(root / str(tied))
    return {tied: str(root / str(tied)) for tied in (False, True)}


def _from_pretrained(path, **kwargs):
    return transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs).eval()


def _assert_same_layers(ours, hf) -> int:
    """Every linear is 4-bit in both models with identical decoded weights, or dense in both with identical
    weights; returns the number of 4-bit linears."""
    count = 0
    for name, module in ours.named_modules():
        theirs = hf.get_submodule(name) if name else hf
        if isinstance(getattr(module, "weight", None), QuantizedTensor):
            assert isinstance(theirs, bnb.nn.Linear4bit), name
            state = theirs.weight.quant_state
            ref = bnb.functional.dequantize_4bit(theirs.weight.data, state)
            assert torch.equal(module.weight.dequantize(ref.dtype), ref), name
            count += 1
        elif isinstance(module, nn.Linear):
            assert type(theirs) is nn.Linear, name
            assert torch.equal(theirs.weight.to(module.weight.dtype), module.weight), name
    return count


@pytest.mark.parametrize(("quant_type", "double_quant", "blocksize", "tied"), [
    ("nf4", True, 64, False), ("nf4", False, 128, True), ("nf4", True, 256, False),
    ("fp4", False, 64, True), ("fp4", True, 128, False), ("fp4", False, 256, True),
])
def test_save_quantized_matrix_loads_in_transformers_with_identical_weights(wide, tmp_path, quant_type,
                                                                            double_quant, blocksize, tied):
    ours = load_model(wide[tied], quantization=quant_type, double_quant=double_quant, blocksize=blocksize)
    # one tensor per shard: a linear's six 4-bit entries are spread over six files
    save_quantized(ours, tmp_path / "q", max_shard_bytes=1)
    hf = _from_pretrained(tmp_path / "q")
    assert _assert_same_layers(ours, hf) == 14
    x = _ids()
    with torch.no_grad():  # after the weight checks: bnb's CPU matmul repacks weights in place
        assert rel_err(ours(x), hf(x).logits) < NF4_REL


def test_quantized_lm_head_loads_in_transformers(checkpoints, tmp_path):
    # no dense linear left: llm_int8_skip_modules must be [] (skip nothing), not null, which transformers reads
    # as "skip its defaults", the lm_head among them
    ours = load_model(checkpoints("gqa"), quantization="nf4", skip_modules=())
    save_quantized(ours, tmp_path / "q")
    assert _assert_same_layers(ours, _from_pretrained(tmp_path / "q")) == 15


def test_a_module_skipped_by_full_name_stays_dense_in_transformers_and_back(checkpoints, tmp_path):
    skip = ("lm_head", "model.layers.0.mlp.down_proj")
    ours = load_model(checkpoints("gqa"), quantization="nf4", skip_modules=skip)
    save_quantized(ours, tmp_path / "q")
    hf = _from_pretrained(tmp_path / "q")
    assert _assert_same_layers(ours, hf) == 13
    assert type(hf.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(hf.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    # and back: transformers quantizing with the same skip list (it cannot re-save a model it loaded pre-quantized)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                             llm_int8_skip_modules=list(skip))
    hf = _from_pretrained(checkpoints("gqa"), quantization_config=config, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bnb")
    assert _assert_same_layers(load_model(tmp_path / "bnb"), hf) == 13


def test_quantization_on_a_prequantized_checkpoint_keeps_its_dense_linears_dense(checkpoints, tmp_path):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16,
                                             llm_int8_skip_modules=["lm_head", "down_proj"])
    hf = _from_pretrained(checkpoints("gqa"), quantization_config=config, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bnb")
    # "nf4" names the stored format; it must not quantize what the checkpoint keeps dense
    assert _assert_same_layers(load_model(tmp_path / "bnb", quantization="nf4"), hf) == 12


def test_compute_dtype_comes_from_the_checkpoints_quantization_config(checkpoints, tmp_path):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float16)
    hf = _from_pretrained(checkpoints("mha_bias"), quantization_config=config, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "bnb", max_shard_size="60KB")
    assert len([f for f in os.listdir(tmp_path / "bnb") if f.endswith(".safetensors")]) > 1
    # transformers computes every Linear4bit in bnb_4bit_compute_dtype, whatever dtype the model is loaded in
    hf = _from_pretrained(tmp_path / "bnb", dtype=torch.float32)
    ours = load_model(tmp_path / "bnb", dtype=torch.float32)
    assert _assert_same_layers(ours, hf) == 14
    assert {m.compute_dtype for m in ours.modules() if hasattr(m, "compute_dtype")} == {torch.float16}
    assert load_model(tmp_path / "bnb", dtype=torch.float32, compute_dtype="bf16").lm_head.weight.dtype == torch.float32
    x = _ids()
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < NF4_REL
    # and save_quantized -> load_model keeps the compute dtype it wrote
    save_quantized(ours, tmp_path / "ours")
    back = load_model(tmp_path / "ours", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))


def _saved(checkpoints, tmp_path) -> str:
    out = tmp_path / "q"
    save_quantized(load_model(checkpoints("gqa"), quantization="nf4"), out)
    return str(out)


def test_config_quant_type_that_contradicts_the_tensors_is_refused(checkpoints, tmp_path):
    path = _saved(checkpoints, tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    message = (r"tensor 'model.layers.0.self_attn.q_proj.weight' is nf4, but config.json's quantization_config "
               r"has bnb_4bit_quant_type 'fp4'")
    with pytest.raises(ValueError, match=message) as error:
        load_model(path)
    _assert_one_line(error)


@pytest.mark.parametrize("suffix", [".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"])
def test_a_missing_4bit_entry_is_named(checkpoints, tmp_path, suffix):
    path = _saved(checkpoints, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight" + suffix]
    save_file(tensors, weights, metadata={"format": "pt"})
    missing = {".absmax": "state is missing key 'model.layers.1.mlp.up_proj.weight.absmax'",
               ".quant_map": "state is missing key 'model.layers.1.mlp.up_proj.weight.quant_map'",
               ".quant_state.bitsandbytes__nf4": r"expected exactly one key .*bitsandbytes__\{nf4,fp4\}, found 0"}
    with pytest.raises(ValueError, match=rf"bad 4-bit state for 'model.layers.1.mlp.up_proj.weight': .*"
                                         rf"{missing[suffix]}") as error:
        load_model(path)
    _assert_one_line(error)
