"""LlamaConfig parsing (both transformers dialects), validation messages, and RoPE frequencies."""

from __future__ import annotations

import json

import pytest
import torch

from nf4lora.model import LlamaConfig
from nf4lora.model.rope import rope_inv_freq

from .conftest import BASE, VARIANTS, hf_model

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def test_reads_legacy_and_rope_parameters_dialects_alike():
    legacy = LlamaConfig.from_hf_dict({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3})
    params = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    modern = LlamaConfig.from_hf_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **params}})
    assert legacy == modern
    assert modern.rope_type == "llama3" and modern.rope_theta == 5e5 and modern.head_dim == 16


def test_old_type_key_and_default_type_are_normalized():
    assert LlamaConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
        "rope_type": "linear", "factor": 2.0}
    default = {"rope_type": "default", "rope_theta": 1e4}
    assert LlamaConfig.from_hf_dict({**BASE, "rope_parameters": default}).rope_scaling is None


@pytest.mark.parametrize("variant", ["gqa", "llama3", "linear_rope"])
def test_inv_freq_matches_transformers(variant):
    hf = hf_model(**VARIANTS[variant])
    ours = rope_inv_freq(LlamaConfig.from_hf_dict(hf.config.to_dict()))
    # Identical float32 formula; only the op order of the llama3 blend may differ by an ulp.
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


def test_to_hf_dict_round_trips_through_transformers():
    import transformers

    cfg = LlamaConfig.from_hf_dict({**BASE, "rope_scaling": LLAMA3, "tie_word_embeddings": True})
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    assert hf_cfg.rope_parameters["rope_type"] == "llama3" and hf_cfg.tie_word_embeddings
    assert LlamaConfig.from_hf_dict(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architectures=\['GPT2LMHeadModel'\] is not supported"),
    ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope_scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing .*low_freq_factor"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_size": 66}, "not divisible by num_attention_heads"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"vocab_size": 0}, "vocab_size=0 must be a positive int"),
    ({"sliding_window": 64}, "sliding_window=64 attention is not supported"),
])
def test_bad_configs_are_rejected_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf_dict({**BASE, **change}, source="cfg.json")


def test_missing_keys_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"cfg.json: missing required keys \['vocab_size'\]"):
        LlamaConfig.from_hf_dict({k: v for k, v in BASE.items() if k != "vocab_size"}, source="cfg.json")
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        LlamaConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 3,\n "hidden_size": }')
    with pytest.raises(ValueError, match=r"config.json: malformed JSON at line 2"):
        LlamaConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        LlamaConfig.from_file(tmp_path)
