"""Adapters that peft saves from configs beyond the common ones load into nf4lora, and back, with peft's outputs."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import peft_from_pretrained, peft_model, perturb_trainables, rel_err, tiny_llama
from nf4lora.lora import LoraConfig, inject_lora, load_adapter, read_adapter_config, save_adapter


def _logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids).logits


MODULES_TO_SAVE = {
    # peft wraps every module whose name ends in the entry: "norm" is model.norm and all the layer norms
    "name-suffix": {"target_modules": ["q_proj"], "modules_to_save": ["norm"]},
    # peft leaves the layers inside a module to save to its full copy: no LoRA on mlp.up_proj
    "target-inside": {"target_modules": ["up_proj", "q_proj"], "modules_to_save": ["mlp"]},
}


@pytest.mark.parametrize("name", list(MODULES_TO_SAVE))
def test_modules_to_save_select_what_peft_selects_in_both_directions(name, tmp_path, input_ids):
    base, spec = tiny_llama(bias=True), {"r": 2, **MODULES_TO_SAVE[name], "init_lora_weights": False}
    theirs = peft_model(base, **spec)
    perturb_trainables(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-6
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**spec))
    perturb_trainables(ours, seed=2)
    save_adapter(ours, tmp_path / "ours")
    assert rel_err(_logits(peft_from_pretrained(base, tmp_path / "ours"), input_ids), _logits(ours, input_ids)) < 1e-6


def test_modules_to_save_that_contain_one_another_are_an_error_and_inject_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
        "modules_to_save=['mlp', 'act_fn'] selects model.layers.0.mlp.act_fn inside model.layers.0.mlp; "
        "expected modules that do not contain one another"
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["mlp", "act_fn"]))
    assert not hasattr(model, "lora_configs")


def test_a_peft_sequence_classification_adapter_loads_with_its_classifier_head(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(config).eval()
    theirs = peft_model(base, r=2, target_modules="all-linear", task_type="SEQ_CLS")
    perturb_trainables(theirs)
    theirs.save_pretrained(tmp_path)
    # peft adds both of its head names; this model has only "score"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    input_ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-6
    assert ours.lora_configs["default"].modules_to_save == ["score"]


def test_a_peft_adapter_on_lm_head_with_the_head_weight_peft_saves_beside_it_loads(tmp_path, input_ids):
    base = tiny_llama()
    theirs = peft_model(base, r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    perturb_trainables(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)  # save_embedding_layers="auto": lm_head is targeted, so its base is saved
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in load_file(tmp_path / "adapter_model.safetensors")
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-6


def test_a_saved_base_weight_that_differs_from_the_model_is_an_error(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(97, 40)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
        "key base_model.model.lm_head.base_layer.weight holds a base weight that differs from the model's"
    )):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "lora_configs")


def test_a_runtime_config_in_adapter_config_is_accepted(tmp_path):
    # peft's runtime_config (ephemeral GPU offload while DoRA initialises) never changes the adapter's math
    d = {**LoraConfig(target_modules=["q_proj"]).to_peft_dict(), "runtime_config": {"ephemeral_gpu_offload": True}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    assert read_adapter_config(tmp_path).target_modules == ["q_proj"]


def test_a_directory_holding_only_named_peft_adapters_lists_their_subfolders(tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, target_modules=["q_proj"]), adapter_name="chat")
    theirs.save_pretrained(tmp_path)  # peft writes a non-default adapter to tmp_path / "chat"
    with pytest.raises(ValueError, match=re.escape(
        "adapter_config.json does not exist; expected a peft adapter directory (peft saves a non-default adapter in "
        "a subfolder: this one has ['chat'])"
    )):
        load_adapter(tiny_llama(), tmp_path)


def test_a_saved_base_weight_in_another_dtype_loads_when_equal_in_the_models_dtype(tmp_path):
    """peft saves the head's base weight in the dtype it trained in (fp32); a bf16 model holds the same weight
    rounded, which loading the copy (cast to bf16, as peft loads it) would not change."""
    save_adapter(inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])), tmp_path)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key] = tiny_llama().lm_head.weight.detach().clone()  # the fp32 copy peft would have saved
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama(dtype=torch.bfloat16)
    load_adapter(model, tmp_path)
    assert model.lora_configs["default"].target_modules == ["q_proj", "lm_head"]
    tensors[key] = tensors[key] + 0.5  # differs even after rounding to bf16
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"key {key} holds a base weight that differs from the model's")):
        load_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path)
