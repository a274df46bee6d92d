"""Bad input found by fuzzing nf4lora.lora against peft 0.21: each is refused in one line naming the value."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lora_helpers import tiny_llama
from nf4lora.lora import (
    LoraConfig, LoraLinear, ModulesToSave, inject_lora, lora_layers, merge_adapters, merge_and_unload, set_adapter,
)


def _two_adapters():
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    return model


def test_a_string_of_adapter_names_is_refused_by_merging_and_merges_nothing():
    # "ab" was read as the list ['a', 'b'] and merged both adapters (peft raises TypeError for a string too)
    model = _two_adapters()
    weights = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model)}
    message = re.escape("adapter_names='ab' is not a list; expected a list of adapter names")
    with pytest.raises(TypeError, match=message):
        merge_adapters(model, "ab")
    with pytest.raises(TypeError, match=message):
        merge_and_unload(model, "ab")
    layers = dict(lora_layers(model))
    assert layers.keys() == weights.keys()
    for name, layer in layers.items():
        assert not layer.merged
        assert torch.equal(layer.base_layer.weight, weights[name])
        with pytest.raises(TypeError, match=message):
            layer.merged_weight("ab")
        with pytest.raises(TypeError, match=message):
            layer.merge("ab")
    merge_adapters(model, ["a", "b"])  # the list form still merges
    assert all(layer.merged_adapters == ["a", "b"] for _, layer in lora_layers(model))


@pytest.mark.parametrize("names", [None, 5])
def test_set_adapter_with_something_other_than_names_is_a_one_line_error(names):
    model = _two_adapters()
    with pytest.raises(TypeError, match=re.escape(f"adapter_names={names!r} is not a name or a list of names; "
                                                  "expected some of ['a', 'b']")):
        set_adapter(model, names)


@pytest.mark.parametrize("name", ["", "a.b", None])
def test_a_layer_built_or_extended_with_an_invalid_adapter_name_is_refused_naming_it(name):
    # a KeyError or TypeError from inside nn.ModuleDict before
    message = re.escape(f"adapter_name={name!r} is not valid; expected a non-empty name without '.'")
    config = LoraConfig(r=2, target_modules=["proj"])
    with pytest.raises(ValueError, match=message):
        LoraLinear(nn.Linear(8, 4), name, config)
    layer = LoraLinear(nn.Linear(8, 4), "default", config)
    with pytest.raises(ValueError, match=message):
        layer.add_adapter(name, config)
    assert list(layer.lora_A) == ["default"]
    with pytest.raises(ValueError, match=message):
        ModulesToSave(nn.Linear(8, 4), name)


def test_inject_lora_with_a_dict_for_a_config_is_a_type_error_naming_the_fix():
    # an AttributeError ('dict' object has no attribute 'modules_to_save') before
    with pytest.raises(TypeError, match=re.escape("config is a dict, not a LoraConfig; expected LoraConfig(...)")):
        inject_lora(tiny_llama(), {"target_modules": ["q_proj"]})
