"""Audit of nf4lora.lora against peft: config values, peft options, bias saving, trainability, failed loads."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_helpers import peft_model, rel_err, tiny_llama, trainable_names
from nf4lora.lora import (
    LoraConfig, active_adapters, adapter_state_dict, inject_lora, load_adapter, read_adapter_config, save_adapter,
    set_adapter,
)


class BiasedHead(nn.Module):
    """proj (24 -> 16) -> LayerNorm -> head (16 -> 10), every one with a bias: x (..., 24) fp32 -> (..., 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def _perturb_trainables(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": "false"}, r"use_dora='false' is not a bool; expected True or False"),
        ({"use_rslora": 1}, r"use_rslora=1 is not a bool; expected True or False"),
        ({"lora_dropout": "0.1"}, r"lora_dropout='0.1' is out of range; expected a number 0 <= p < 1"),
        ({"lora_dropout": float("nan")}, r"lora_dropout=nan is out of range"),
        ({"lora_alpha": float("inf")}, r"lora_alpha=inf is not a finite number"),
    ],
)
def test_config_rejects_non_bool_flags_non_numeric_dropout_and_non_finite_alpha(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"], "nblocks": 2}),
        ("kasa_config", {"beta": 0.1}),
        ("velora_config", {"num_groups": 4}),
        ("monteclora_config", {"dirichlet_prior": 1.0}),
        ("lora_ga_config", {"batch_size": 2}),
        ("ensure_weight_tying", True),
        ("an_option_of_a_later_peft", 3),
    ],
)
def test_peft_options_that_change_the_adapter_are_refused_on_load(key, value):
    d = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    d[key] = value
    with pytest.raises(ValueError, match=re.escape(key)):
        LoraConfig.from_peft_dict(d)


def test_a_default_peft_config_with_its_metadata_loads(tmp_path):
    from peft import LoraConfig as PeftLoraConfig

    PeftLoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    config = read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 6, ["q_proj"])


def test_bias_all_with_a_biased_module_to_save_moves_both_ways_with_peft(tmp_path):
    # peft's bias="all" saves every ``.bias`` of the model, the wrapper's original_module/modules_to_save ones too
    torch.manual_seed(0)
    base = BiasedHead()
    spec = {"r": 3, "target_modules": ["proj"], "modules_to_save": ["head"], "bias": "all", "init_lora_weights": False}
    theirs = peft_model(base, **spec)
    _perturb_trainables(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(5, 24)
    with torch.no_grad():
        # fp32, same weights, same ops.
        assert rel_err(ours(x), theirs(x)) < 1e-6
    save_adapter(ours, tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(reloaded(x), theirs(x)) < 1e-6


def test_lora_only_trains_exactly_the_biases_its_adapter_saves_and_only_while_active():
    base = tiny_llama(bias=True)
    model = inject_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]), "a")
    inject_lora(model, LoraConfig(r=2, target_modules=["v_proj"], bias="lora_only"), "b")
    saved = {k.removeprefix("base_model.model.") for k in adapter_state_dict(model, "b") if k.endswith("bias")}
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trained == saved == {f"model.layers.{i}.self_attn.v_proj.base_layer.bias" for i in range(2)}
    set_adapter(model, "a")  # bias="none"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    theirs = peft_model(base, r=2, target_modules=["v_proj"], bias="lora_only")
    assert trainable_names(inject_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules=["v_proj"],
                                                                       bias="lora_only"))) == trainable_names(theirs)


def test_a_modules_to_save_entry_that_matches_nothing_is_an_error_and_injects_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
        "modules_to_save entries ['lmhead'] match no module; module names end in: ['act_fn', 'down_proj', "
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head", "lmhead"]))
    assert not hasattr(model, "lora_configs")
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith(("q_proj", "lm_head")))


def test_set_adapter_with_no_names_is_an_error():
    model = inject_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter_names=\[\] is empty; expected some of \['default'\]"):
        set_adapter(model, [])
    assert active_adapters(model) == ["default"]


def test_a_failed_load_keeps_the_active_adapters_and_trainable_parameters(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"])), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "a")
    inject_lora(model, LoraConfig(r=2, target_modules=["k_proj"]), "c")
    set_adapter(model, ["a", "c"])
    trainable = trainable_names(model)
    with pytest.raises(ValueError, match=r"has shape \(2, 40\), expected \(3, 40\)"):
        load_adapter(model, tmp_path, "b")
    assert active_adapters(model) == ["a", "c"]
    assert trainable_names(model) == trainable
