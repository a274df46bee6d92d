"""Injection, freezing, adapter switching, merging and parameter accounting on a tiny Hugging Face Llama."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lora_helpers import (
    OneLayer, peft_model, rel_err, tiny_llama, trainable_names, lora_module_names,
)
from nf4lora.lora import (
    LoraConfig, LoraLinear, ModulesToSave, active_adapters, delete_adapter, disable_adapters, inject_lora,
    merge_adapters, merge_and_unload, print_trainable_parameters, set_adapter, unmerge_adapters,
)
from nf4lora.nf4.linear import NF4Linear, quantize_linears


@pytest.mark.parametrize(
    "spec",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*\.mlp\.(gate|up)_proj"},
        {"target_modules": "all-linear"},
        {"target_modules": ["layers.1.self_attn.o_proj", "down_proj"], "exclude_modules": ["layers.0.mlp.down_proj"]},
        {"target_modules": "all-linear", "modules_to_save": ["lm_head", "k_proj"]},
    ],
    ids=["suffixes", "regex", "all-linear", "paths-exclude", "all-linear-save"],
)
def test_target_modules_select_the_same_modules_as_peft(spec):
    base = tiny_llama()
    ours = inject_lora(copy.deepcopy(base), LoraConfig(r=2, **spec))
    theirs = peft_model(base, r=2, **spec)
    assert lora_module_names(ours) == lora_module_names(theirs)
    assert "lm_head" not in lora_module_names(ours)


def test_a_target_that_matches_nothing_lists_the_linear_modules():
    with pytest.raises(ValueError, match=re.escape(
        "target_modules=['qproj'] matches no linear module; linear modules: names ending in ['down_proj', "
    )):
        inject_lora(tiny_llama(), LoraConfig(target_modules=["qproj"]))


def test_a_misspelt_entry_beside_a_good_one_is_an_error_and_injects_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
        "target_modules entries ['qproj'] match no module; linear modules: names ending in ['down_proj', "
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj", "qproj"]))
    assert lora_module_names(model) == set()


def test_exclude_modules_that_remove_every_target_are_named_as_the_cause():
    with pytest.raises(ValueError, match=re.escape(
        "exclude_modules=['q_proj'] excludes every module that target_modules=['q_proj'] selects: names ending in "
        "['q_proj'] (2 modules, such as 'model.layers.0.self_attn.q_proj')"
    )):
        inject_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_a_non_linear_target_is_rejected():
    with pytest.raises(ValueError, match=r"selects non-linear modules \['model.layers.0.input_layernorm'"):
        inject_lora(tiny_llama(), LoraConfig(target_modules=["input_layernorm", "q_proj"]))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_and_the_printed_counts_equal_peft(bias, capsys):
    base = tiny_llama(bias=True)
    spec = {"r": 3, "target_modules": ["q_proj", "up_proj"], "bias": bias, "modules_to_save": ["lm_head"]}
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**spec))
    theirs = peft_model(base, **spec)
    assert trainable_names(ours) == trainable_names(theirs)
    capsys.readouterr()
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    print_trainable_parameters(ours)
    our_lines = capsys.readouterr().out.strip().splitlines()
    assert our_lines[0] == peft_line
    assert re.fullmatch(r"base bytes: [\d.]+ KiB \|\| adapter bytes: [\d.]+ KiB", our_lines[1])


def test_nf4_weights_count_as_their_logical_parameters_and_their_real_bytes(capsys):
    dense = tiny_llama()
    n_dense = sum(p.numel() for p in dense.parameters())
    model = quantize_linears(copy.deepcopy(dense), compute_dtype=torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = print_trainable_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora and total == n_dense + lora
    nf4_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, NF4Linear))
    other_bytes = sum(4 * p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    line = capsys.readouterr().out.strip().splitlines()[1]
    assert line == f"base bytes: {(nf4_bytes + other_bytes) / 1024:.1f} KiB || adapter bytes: {4 * lora / 1024:.1f} KiB"


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_adapter_bytes_count_every_adapter_active_or_not_and_base_bytes_the_base(nf4, capsys):
    base = tiny_llama()
    if nf4:
        base = quantize_linears(base, compute_dtype=torch.bfloat16)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    base_bytes += sum(m.weight.nbytes for m in base.modules() if isinstance(m, NF4Linear))
    model = inject_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "a")
    inject_lora(model, LoraConfig(r=8, target_modules="all-linear", modules_to_save=["lm_head"]), "b")
    set_adapter(model, "a")  # "b", inactive, is frozen but still held in memory
    adapter_bytes = sum(4 * p.numel() for n, p in model.named_parameters()
                        if re.search(r"\.(lora_A|lora_B|lora_magnitude_vector|modules_to_save)\.", n))
    assert any(".b." in n and not p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        trainable, _ = print_trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".a." in n)
    line = capsys.readouterr().out.strip().splitlines()[1]
    assert line == f"base bytes: {base_bytes / 1024:.1f} KiB || adapter bytes: {adapter_bytes / 1024:.1f} KiB"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_dora_adapter_without_dropout_after_another_active_adapter_matches_peft(train):
    # Without dropout DoRA takes its base output as y - bias, where y already holds the first adapter's term
    # (peft does the same); a biased linear makes the subtraction matter.
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(9)
    base = OneLayer(nn.Linear(56, 44, bias=True))
    first = {"r": 6, "lora_alpha": 12, "target_modules": ["proj"], "init_lora_weights": False}
    second = {**first, "r": 3, "use_dora": True}
    theirs = peft_model(base, **first)
    theirs.add_adapter("b", PeftLoraConfig(**second))
    theirs.base_model.set_adapter(["default", "b"])
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**first))
    inject_lora(ours, LoraConfig(**second), "b")
    set_adapter(ours, ["default", "b"])
    theirs_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_params.keys() == trainable_names(theirs)
    with torch.no_grad():
        for name, p in ours_params.items():  # off the initial values: a DoRA magnitude unequal to the weight norm
            p.add_(0.05 * torch.randn(p.shape))
            theirs_params[name].copy_(p)
    theirs.train(train), ours.train(train)
    x = torch.randn(4, 56)
    ours_y, theirs_y = ours(x), theirs(x)
    ours_y.square().sum().backward()
    theirs_y.square().sum().backward()
    # fp32, same operations up to association order.
    assert rel_err(ours_y, theirs_y) < 1e-6
    for name, p in ours_params.items():
        assert rel_err(p.grad, theirs_params[name].grad) < 1e-6, name


def test_only_adapter_parameters_receive_gradients(input_ids):
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model(input_ids).logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_adapters_switch_and_each_alone_equals_a_model_with_only_that_adapter(input_ids):
    base = tiny_llama()
    cfg_a = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg_b = LoraConfig(r=5, lora_alpha=3, target_modules=["v_proj", "down_proj"], use_dora=True,
                       init_lora_weights=False)
    torch.manual_seed(10)
    only_a = inject_lora(copy.deepcopy(base), cfg_a, "a")
    torch.manual_seed(11)
    only_b = inject_lora(copy.deepcopy(base), cfg_b, "b")
    both = inject_lora(copy.deepcopy(only_a), cfg_b, "b")
    both.load_state_dict(only_b.state_dict(), strict=False)
    assert active_adapters(both) == ["b"]
    assert trainable_names(both) == {n for n in trainable_names(only_b)}
    with torch.no_grad():
        # fp32, identical operations: bit-equal.
        assert torch.equal(both(input_ids).logits, only_b(input_ids).logits)
        set_adapter(both, "a")
        assert torch.equal(both(input_ids).logits, only_a(input_ids).logits)
        set_adapter(both, ["a", "b"])
        combined = both(input_ids).logits
        assert not torch.equal(combined, only_a(input_ids).logits)
        with disable_adapters(both):
            assert torch.equal(both(input_ids).logits, base(input_ids).logits)
        merge_adapters(both)  # "a" and "b" share v_proj; q_proj holds only "a", down_proj only "b"
        assert rel_err(both(input_ids).logits, combined) < 1e-5  # fp32 reassociation through 2 layers
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]; injected adapters: \['a', 'b'\]"):
        set_adapter(both, "c")
    with pytest.raises(ValueError, match=r"adapter 'a' is already injected"):
        inject_lora(both, cfg_a, "a")


def test_delete_adapter_restores_the_plain_modules(input_ids):
    base = tiny_llama()
    cfg_a = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = inject_lora(copy.deepcopy(base), cfg_a, "a")
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), "b")
    delete_adapter(model, "b")
    assert lora_module_names(model) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert active_adapters(model) == ["a"]
    delete_adapter(model, "a")
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_gives_plain_linears_with_the_adapted_outputs(use_dora, input_ids):
    model = inject_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora,
                                                 modules_to_save=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        expected = model(input_ids).logits
        merge_adapters(model)
        merged = model(input_ids).logits
        unmerge_adapters(model)
        assert torch.allclose(model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)  # fp32 round trip
        merge_and_unload(model)
        unloaded = model(input_ids).logits
    # fp32; merged weights reassociate every product through 2 layers: ~1e-6.
    assert rel_err(merged, expected) < 1e-5 and rel_err(unloaded, expected) < 1e-5
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert not hasattr(model, "lora_configs")


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_merge_and_unload_on_nf4_gives_dense_weights_or_warns_when_requantizing(use_dora, input_ids):
    qmodel = quantize_linears(tiny_llama(), compute_dtype=torch.float32)
    inject_lora(qmodel, LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False))
    with torch.no_grad():
        for name, p in qmodel.named_parameters():
            if "lora_magnitude_vector" in name:  # m / ||W'|| away from 1, row by row
                p.mul_(torch.linspace(0.8, 1.2, p.numel()))
        expected = qmodel(input_ids).logits
        dense = merge_and_unload(copy.deepcopy(qmodel))
        assert {type(m) for n, m in dense.named_modules() if n.endswith("proj")} == {nn.Linear}
        # fp32 compute on the dequantized weights: reassociation only.
        assert rel_err(dense(input_ids).logits, expected) < 1e-5
        with pytest.warns(UserWarning, match=r"re-quantizes W \+ scaling\*B@A to NF4"):
            requant = merge_and_unload(copy.deepcopy(qmodel), requantize=True)
        requant_layers = {n: m for n, m in requant.named_modules() if n.endswith("proj")}
        assert {type(m) for m in requant_layers.values()} == {NF4Linear}
        # Re-quantizing is NF4 rounding of exactly the dense merged weight: bit-equal to quantizing it afresh.
        for name, layer in requant_layers.items():
            fresh = NF4Linear.from_linear(dense.get_submodule(name))
            assert torch.equal(layer.dequantized_weight(torch.float32), fresh.dequantized_weight(torch.float32))
            assert not torch.equal(layer.dequantized_weight(torch.float32), dense.get_submodule(name).weight)
