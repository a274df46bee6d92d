"""Fuzz audit of nf4lora.model against transformers 5: the configs and checkpoint files that fuzzing found read
differently from transformers, accepted although malformed, or refused without naming the bad value."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4lora.model import LlamaConfig, load_model

from .conftest import VARIANTS, rel_err
from .test_llama import FP32_REL, _ids
from .test_loading import _copy, _edit_config
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


def _copy_with_config(src: str, dst, **changes) -> str:
    path = _copy(src, dst)
    _edit_config(path, **changes)
    return path


def test_rope_scaling_beside_rope_parameters_is_read_first_as_transformers_reads_it(checkpoints, tmp_path):
    # A config carrying both keys that disagree (a 4.x tool edited rope_scaling, a stale rope_parameters stayed):
    # transformers 5 applies rope_scaling; we applied rope_parameters' plain RoPE, so every position > 0 differed.
    linear = VARIANTS["linear_rope"]["rope_parameters"]
    path = _copy_with_config(checkpoints("linear_rope"), tmp_path / "m", rope_scaling=linear,
                             rope_parameters={"rope_type": "default", "rope_theta": linear["rope_theta"]})
    reference = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert reference.config.rope_parameters["rope_type"] == "linear"
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.rope_type == "linear"
    x = _ids()
    with torch.no_grad():
        assert rel_err(ours(x), reference(x).logits) < FP32_REL


@pytest.mark.parametrize(("change", "message"), [
    # accepted before: a truthy string tied the head (or added biases) against the checkpoint
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' must be true or false"),
    ({"attention_bias": None}, r"attention_bias=None must be true or false"),
    ({"rms_norm_eps": True}, r"rms_norm_eps=True must be a finite number > 0"),
    # accepted before: generate later failed on a str stop id
    ({"eos_token_id": "2"}, r"eos_token_id='2' is not a token id; valid: an int, a list of ints or null"),
    ({"eos_token_id": [2, "3"]}, r"eos_token_id=\[2, '3'\] is not a token id"),
    ({"pad_token_id": 1.5}, r"pad_token_id=1.5 is not a token id; valid: an int or null"),
    # accepted before: the model build then failed deep inside rope_inv_freq
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": "1"}},
     r"rope_scaling low_freq_factor='1' must be a finite number > 0"),
    ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": None}},
     r"rope_scaling original_max_position_embeddings=None must be a positive int"),
    # refused before, but as "'>' not supported between instances of 'str' and 'int'", naming nothing
    ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps='1e-5' must be a finite number > 0"),
    ({"rope_theta": None}, r"rope_theta=None must be a finite number > 0"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, r"rope_scaling factor='2' must be a finite number"),
    ({"hidden_size": "64"}, r"hidden_size='64' must be a positive int"),
    ({"rope_parameters": "default"}, r"rope_parameters='default' must be a dict or null"),
    # raised a bare TypeError before
    ({"architectures": 7}, r"architectures=7 is not supported; valid: a list holding one of"),
    ({"sliding_window": "4096"}, r"sliding_window='4096' attention is not supported; valid: null"),
    ({"rope_parameters": [1, 2]}, r"rope_parameters=\[1, 2\] must be a dict or null"),
])
def test_config_values_of_the_wrong_type_are_refused_in_one_line_naming_them(change, message):
    with pytest.raises(ValueError, match=rf"^cfg.json: {message}") as error:
        LlamaConfig.from_hf_dict({**BASE, **change}, source="cfg.json")
    _assert_one_line(error)


def test_a_sliding_window_as_long_as_the_context_still_loads():
    assert LlamaConfig.from_hf_dict({**BASE, "sliding_window": 128}).max_position_embeddings == 128


@pytest.mark.parametrize("eos", ["2", 2.0, [2, None]])
def test_generation_config_ids_of_the_wrong_type_are_refused_naming_the_file(tmp_path, eos):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    config = LlamaConfig.from_hf_dict(BASE)
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=.* is not a token id") as error:
        config.update_from_generation_config(tmp_path)
    _assert_one_line(error)
    assert config.eos_token_id == 2  # left as config.json set it


@pytest.mark.parametrize(("key", "dtype", "quantization"), [
    ("model.norm.weight", torch.int32, None),
    ("model.layers.0.mlp.up_proj.weight", torch.uint8, None),
    ("model.layers.1.self_attn.q_proj.weight", torch.bool, "nf4"),
])
def test_a_dense_tensor_stored_as_integers_is_refused_naming_it(checkpoints, tmp_path, key, dtype, quantization):
    # transformers casts such a tensor to the load dtype; the values (codes of a 4-bit weight that lost its quant
    # state, say) are not weights, so the checkpoint is refused rather than loaded as nonsense
    path = str(tmp_path / "m")
    shutil.copytree(checkpoints("gqa"), path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' is stored as [A-Z0-9]+; valid: a "
                                         rf"float dtype") as error:
        load_model(path, quantization=quantization)
    _assert_one_line(error)


def test_half_precision_tensors_in_a_float32_file_load_cast_as_transformers_casts_them(checkpoints, tmp_path):
    # the dtype check must not refuse a legitimate mix of float dtypes within one file
    path = str(tmp_path / "m")
    shutil.copytree(checkpoints("gqa"), path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    for key, dtype in (("model.norm.weight", torch.bfloat16), ("model.layers.0.mlp.up_proj.weight", torch.float16)):
        tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    reference = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path, dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        assert rel_err(ours(x), reference(x).logits) < FP32_REL
