"""Adapters on disk in peft's format: nf4lora -> peft, peft -> nf4lora, and the mismatch errors."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import (bnb_quantize_linears, peft_from_pretrained, peft_model, perturb_trainables, rel_err,
                          tiny_llama)
from nf4lora.lora import (
    LoraConfig, LoraLinear, adapter_state_dict, inject_lora, load_adapter, save_adapter, set_adapter,
)
from nf4lora.nf4.linear import quantize_linears

CONFIGS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "dora-rslora-bias-all-save": {"r": 3, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                  "use_dora": True, "use_rslora": True, "bias": "all", "modules_to_save": ["lm_head"]},
    "regex-lora-only-bias": {"r": 2, "target_modules": r"model\.layers\.1\..*_proj", "bias": "lora_only"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_adapter_we_save_loads_in_peft_with_the_same_outputs(name, tmp_path, input_ids):
    base = tiny_llama(bias=True)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**CONFIGS[name], init_lora_weights=False))
    perturb_trainables(ours, seed=1)
    save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft_from_pretrained(base, tmp_path)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(input_ids).logits, theirs(input_ids).logits
    assert not torch.allclose(ours_logits, base(input_ids).logits, atol=1e-3)
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(ours_logits, theirs_logits) < 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_adapter_peft_saved_loads_into_nf4lora_with_the_same_outputs(name, tmp_path, input_ids):
    base = tiny_llama(bias=True)
    theirs = peft_model(base, **CONFIGS[name], init_lora_weights=False)
    perturb_trainables(theirs, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        # fp32, same weights, same ops up to association order: ~1e-7.
        assert rel_err(ours(input_ids).logits, theirs(input_ids).logits) < 1e-6
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ours_sd = adapter_state_dict(ours)
    assert ours_sd.keys() == tensors.keys()
    assert all(torch.equal(ours_sd[k], tensors[k]) for k in tensors)


def test_two_peft_adapters_load_under_their_names_and_switch_like_peft(tmp_path, input_ids):
    base = tiny_llama()
    for i, cfg in enumerate((CONFIGS["lora"], {"r": 6, "target_modules": ["k_proj", "up_proj"], "use_dora": True})):
        theirs = peft_model(base, **cfg, init_lora_weights=False)
        perturb_trainables(theirs, seed=10 + i)
        theirs.save_pretrained(tmp_path / f"a{i}")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "a0", "first")
    load_adapter(ours, tmp_path / "a1", "second")
    theirs = peft_from_pretrained(base, tmp_path / "a0", "first")
    theirs.load_adapter(tmp_path / "a1", adapter_name="second")
    with torch.no_grad():
        for name in ("first", "second"):
            set_adapter(ours, name)
            theirs.set_adapter(name)
            # fp32, same ops up to association order.
            assert rel_err(ours(input_ids).logits, theirs(input_ids).logits) < 1e-6, name


def test_adapter_keys_are_the_same_on_an_nf4_base_and_a_dense_one():
    base = tiny_llama()
    cfg = LoraConfig(r=2, target_modules="all-linear", use_dora=True)
    dense_keys = adapter_state_dict(inject_lora(copy.deepcopy(base), cfg)).keys()
    nf4_model = quantize_linears(copy.deepcopy(base), compute_dtype=torch.bfloat16)
    nf4_keys = adapter_state_dict(inject_lora(nf4_model, cfg)).keys()
    assert dense_keys == nf4_keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in nf4_keys


def _saved(tmp_path, **cfg):
    model = inject_lora(tiny_llama(), LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **cfg}))
    save_adapter(model, tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")


def _assert_model_untouched(model, base):
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert not hasattr(model, "lora_configs")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad for p in model.parameters())  # a fresh HF model trains everything


def test_loading_an_adapter_with_a_missing_key_names_it_and_leaves_the_model_as_it_was(tmp_path):
    tensors = _saved(tmp_path)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
        "does not fit the model: missing keys ['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'], "
        "unexpected keys []"
    )):
        load_adapter(model, tmp_path)
    _assert_model_untouched(model, tiny_llama())


def test_loading_an_adapter_with_unexpected_keys_names_them(tmp_path):
    tensors = _saved(tmp_path)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 40)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape(
        "missing keys [], unexpected keys ['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight']"
    )):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_an_adapter_for_another_model_names_the_key_and_shapes(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"key base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight "
                                         r"has shape \(2, 40\), expected \(3, 40\)"):
        load_adapter(model, tmp_path)
    _assert_model_untouched(model, tiny_llama())


def test_loading_an_adapter_whose_targets_are_absent_lists_the_linear_modules(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query"]}))
    with pytest.raises(ValueError, match=r"matches no linear module; linear modules: names ending in \['down_proj'"):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_from_a_directory_without_an_adapter_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_config\.json does not exist"):
        load_adapter(tiny_llama(), tmp_path)


def test_a_save_that_fails_midway_leaves_the_saved_adapter_whole(tmp_path, monkeypatch):
    """save_adapter wrote in place: a crash (or a full disk) while it wrote the weights left a truncated
    adapter_model.safetensors over the last good one. Each file now replaces its old version in one rename."""
    from nf4lora.lora import adapters

    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    perturb_trainables(model, seed=2)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_a_qlora_adapter_moves_between_nf4lora_nf4_and_peft_on_bitsandbytes_4bit(use_dora, tmp_path, input_ids):
    base = tiny_llama()
    ours = inject_lora(quantize_linears(copy.deepcopy(base), compute_dtype=torch.float32),
                       LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False))
    perturb_trainables(ours, seed=3)
    save_adapter(ours, tmp_path)
    theirs = peft_from_pretrained(bnb_quantize_linears(copy.deepcopy(base)), tmp_path)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())
    # In eval mode bitsandbytes repacks CPU weights for a kernel that needs out_features % 32 == 0; train mode
    # (no dropout configured, so the same function) keeps the plain dequantize path.
    theirs.train()
    with torch.no_grad():
        # Both sides dequantize the same NF4 bytes to fp32 and compute in fp32: reassociation only.
        assert rel_err(ours(input_ids).logits, theirs(input_ids).logits) < 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_a_qlora_adapter_peft_trained_on_bitsandbytes_4bit_loads_into_nf4lora_nf4(use_dora, tmp_path, input_ids):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_model(bnb_quantize_linears(copy.deepcopy(base)), r=4, target_modules="all-linear",
                            use_dora=use_dora, init_lora_weights=False)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())
    perturb_trainables(theirs, seed=4)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(quantize_linears(copy.deepcopy(base), compute_dtype=torch.float32), tmp_path)
    # As above: train mode keeps bitsandbytes on its plain dequantize path (no dropout configured).
    theirs.train()
    with torch.no_grad():
        # Both sides dequantize the same NF4 bytes to fp32 and compute in fp32: reassociation only.
        assert rel_err(ours(input_ids).logits, theirs(input_ids).logits) < 1e-5
