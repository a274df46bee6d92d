"""LoraConfig: validation, scaling and the peft adapter_config.json mapping."""

from __future__ import annotations

import math

import pytest
import torch

from nf4lora.lora import LoraConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r=0 is not a valid rank"),
        ({"r": True}, r"r=True is not a valid rank"),
        ({"target_modules": None}, r"target_modules=None"),
        ({"target_modules": "q_proj("}, r"is not a valid regex"),
        ({"target_modules": ["q_proj", ""]}, r"target_modules=.* non-empty"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 is out of range"),
        ({"bias": "some"}, r"bias='some' is not a bias mode; expected one of \('none', 'all', 'lora_only'\)"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
        ({"init_lora_weights": 1}, r"init_lora_weights=1 is not supported"),
        ({"lora_dtype": torch.int8}, r"lora_dtype=torch.int8 is not a floating"),
    ],
)
def test_config_rejects_invalid_values_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["q"]).scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["q"], use_rslora=True).scaling == 8.0
    assert math.isclose(LoraConfig(r=3, lora_alpha=1, target_modules=["q"], use_rslora=True).scaling, 1 / math.sqrt(3))


def test_peft_dict_round_trips_and_builds_the_same_peft_config():
    from peft import LoraConfig as PeftLoraConfig

    ours = LoraConfig(
        r=4, lora_alpha=12, target_modules=r".*\.(q|v)_proj", lora_dropout=0.1, bias="lora_only", use_rslora=True,
        use_dora=True, init_lora_weights="gaussian", modules_to_save=["lm_head"], exclude_modules=["layers.0.q_proj"],
    )
    d = ours.to_peft_dict("some/model")
    assert LoraConfig.from_peft_dict(d) == ours
    theirs = PeftLoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "revision")})
    for field in ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
                  "init_lora_weights"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert list(theirs.modules_to_save) == ours.modules_to_save
    assert sorted(theirs.exclude_modules) == ours.exclude_modules


@pytest.mark.parametrize(
    ("key", "value"), [("fan_in_fan_out", True), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"])]
)
def test_from_peft_dict_rejects_options_that_change_the_math(key, value):
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    d[key] = value
    with pytest.raises(ValueError, match=rf"peft option {key}=.* is not supported"):
        LoraConfig.from_peft_dict(d)


def test_from_peft_dict_rejects_other_peft_types():
    with pytest.raises(ValueError, match=r"peft_type='IA3' is not supported; expected 'LORA'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q"]})
