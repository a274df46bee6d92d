"""peft's per-module options, live against peft: rank_pattern / alpha_pattern, layers_to_transform / layers_pattern
and lora_bias select, size, run, merge, save and load as peft's get_peft_model / PeftModel do."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

from lora_helpers import (bnb_quantize_linears, lora_module_names, peft_from_pretrained, peft_model, perturb_trainables,
                          rel_err, tiny_llama, trainable_names)
from nf4lora.lora import (
    LoraConfig, LoraLinear, adapter_state_dict, inject_lora, load_adapter, lora_layers, merge_adapters,
    merge_and_unload, print_trainable_parameters, save_adapter, unmerge_adapters,
)
from nf4lora.nf4.linear import quantize_linears

SPECS = {
    # a suffix, an escaped regex and a ^-anchored full-name regex, "q_proj" and "^model.layers.2.*" both applying to
    # layer 2's q_proj (the first wins); rsLoRA scales each module by its own r
    "rank-alpha-patterns": {
        "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
        "rank_pattern": {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 6, "^model.layers.2.*": 3},
        "alpha_pattern": {"down_proj": 16, "model.layers.0.self_attn.q_proj": 1.5},
    },
    "layers-int": {"r": 2, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": 1},
    "layers-list-pattern": {"r": 3, "target_modules": ["k_proj", "o_proj"], "layers_to_transform": [0, 2],
                            "layers_pattern": ["h", "layers"]},
    # an entry naming a module in full is adapted outside the selected layers
    "layers-full-name": {"r": 2, "target_modules": ["q_proj", "model.layers.0.mlp.down_proj"],
                         "layers_to_transform": [2]},
    "layers-empty-is-all": {"r": 2, "target_modules": ["gate_proj"], "layers_to_transform": []},
    "lora-bias": {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "o_proj", "up_proj"], "lora_bias": True},
    "lora-bias-bias-all": {"r": 2, "target_modules": ["v_proj", "down_proj"], "lora_bias": True, "bias": "all"},
    "everything": {
        "r": 2, "target_modules": ["q_proj", "v_proj", "up_proj"], "layers_to_transform": [1, 2],
        "rank_pattern": {"v_proj": 5}, "alpha_pattern": {"up_proj": 7}, "lora_bias": True, "bias": "lora_only",
        "modules_to_save": ["lm_head"],
    },
    "rank-alpha-disjoint": {
        "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
        "rank_pattern": {r"layers\.1\.self_attn\.v_proj": 6, "^model.layers.2.mlp.*": 3},
        "alpha_pattern": {"q_proj": 16, "model.layers.0.self_attn.v_proj": 1.5},
    },
}
# peft saves the pattern dicts with sorted keys, so its own adapter with keys that overlap comes back with other ranks
# (its PeftModel.from_pretrained fails on the shapes, as load_adapter does); ours keep their order
PEFT_SAVES_INTACT = [name for name in SPECS if name != "rank-alpha-patterns"]


def _peft_save(model, directory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft 0.21 takes a 1-D lora_B.bias for a ZeRO-3 shard and warns
        model.save_pretrained(directory)


def _logits(model, input_ids, grad: bool = False):
    """Logits without autograd (the unfused path) or with it (the training path: base and LoRA in one node)."""
    with torch.set_grad_enabled(grad):
        return model(input_ids).logits


def _sizes(model) -> dict[str, tuple[int, float]]:
    """(r, scaling) of the default adapter by module name, ours or peft's."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for name, m in model.named_modules() if isinstance(m, (LoraLinear, LoraLayer))}


def _copy_from_peft(theirs, ours) -> None:
    """Give our adapters peft's values: every trainable tensor, by parameter name (LoRA A/B, B's bias, copies)."""
    their_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(their_params[name])


@pytest.mark.parametrize("name", list(SPECS))
def test_the_same_modules_get_adapters_of_the_same_r_and_scaling_as_in_peft(name):
    base = tiny_llama(layers=3, hidden=64, intermediate=96)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**SPECS[name]))
    theirs = peft_model(base, **SPECS[name])
    assert _sizes(ours) == _sizes(theirs)
    assert lora_module_names(ours) == lora_module_names(theirs)
    assert trainable_names(ours) == trainable_names(theirs)


def test_the_first_pattern_key_that_applies_wins_as_in_peft():
    sizes = _sizes(inject_lora(tiny_llama(layers=3, hidden=64, intermediate=96), LoraConfig(**SPECS["rank-alpha-patterns"])))
    assert sizes == _sizes(peft_model(tiny_llama(layers=3, hidden=64, intermediate=96), **SPECS["rank-alpha-patterns"]))
    # "q_proj" comes before "^model.layers.2.*"; layer 2's other modules take the regex
    assert sizes["model.layers.2.self_attn.q_proj"] == (4, 4 / 2)
    assert sizes["model.layers.2.mlp.down_proj"] == (3, 16 / 3 ** 0.5)
    assert sizes["model.layers.0.self_attn.q_proj"] == (4, 1.5 / 2)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("bias", [False, True], ids=["base-no-bias", "base-bias"])
def test_outputs_and_gradients_equal_peft_with_the_same_weights(name, bias, input_ids):
    base = tiny_llama(bias=bias, layers=3, hidden=64, intermediate=96)
    theirs = peft_model(base, **SPECS[name], init_lora_weights=False)
    perturb_trainables(theirs, seed=1)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**SPECS[name]))
    _copy_from_peft(theirs, ours)
    expected = _logits(theirs, input_ids, grad=True)
    assert not torch.allclose(expected, _logits(base, input_ids), atol=1e-3)
    # fp32, same weights, same ops up to association order: ~1e-7, on both of our forward paths.
    assert rel_err(_logits(ours, input_ids), expected) < 1e-6
    actual = _logits(ours, input_ids, grad=True)
    assert rel_err(actual, expected) < 1e-6
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    their_params = dict(theirs.base_model.model.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, g in grads.items():
        # fp32 in another order, through up to 3 layers of backward: with a LoRA bias the A gradients are ill
        # conditioned and peft's own fp32 ones are ~1.5e-5 off a float64 run (ours too); the rest agree to ~1e-6.
        assert rel_err(g, their_params[n].grad) < 1e-4, n


@pytest.mark.parametrize("name", list(SPECS))
def test_an_adapter_we_save_loads_in_peft_and_back_with_the_same_outputs(name, tmp_path, input_ids):
    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**SPECS[name], init_lora_weights=False))
    perturb_trainables(ours, seed=3)
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "lora_bias"):
        assert saved[field] == SPECS[name].get(field, getattr(LoraConfig(target_modules=["q"]), field)), field
    theirs = peft_from_pretrained(base, tmp_path)
    assert _sizes(theirs) == _sizes(ours)
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(theirs, input_ids), _logits(ours, input_ids)) < 1e-6
    back = load_adapter(copy.deepcopy(base), tmp_path)
    assert _sizes(back) == _sizes(ours)
    assert torch.equal(_logits(back, input_ids), _logits(ours, input_ids))


@pytest.mark.parametrize("name", PEFT_SAVES_INTACT)
def test_an_adapter_peft_saved_loads_into_nf4lora_with_the_same_outputs(name, tmp_path, input_ids):
    from safetensors.torch import load_file

    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    theirs = peft_model(base, **SPECS[name], init_lora_weights=False)
    perturb_trainables(theirs, seed=4)
    _peft_save(theirs, tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert _sizes(ours) == _sizes(theirs)
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-6
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    ours_sd = adapter_state_dict(ours)
    assert ours_sd.keys() == tensors.keys()
    assert all(torch.equal(ours_sd[k], tensors[k]) for k in tensors)
    if SPECS[name].get("lora_bias"):
        assert any(k.endswith(".lora_B.bias") for k in tensors)


@pytest.mark.parametrize("name", ["rank-alpha-disjoint", "everything"])
def test_trainable_counts_print_as_peft_prints_them(name, capsys):
    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**SPECS[name]))
    theirs = peft_model(base, **SPECS[name])
    capsys.readouterr()
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    print_trainable_parameters(ours)
    assert capsys.readouterr().out.splitlines()[0] == peft_line


def test_a_qlora_adapter_with_patterns_layers_and_lora_bias_moves_between_nf4lora_nf4_and_peft_bnb_in_bf16(
    tmp_path, input_ids
):
    spec = {key: value for key, value in SPECS["everything"].items() if key != "modules_to_save"}
    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_model(bnb_quantize_linears(copy.deepcopy(base), compute_dtype=torch.bfloat16), **spec)
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())
    perturb_trainables(theirs, seed=5)
    _peft_save(theirs, tmp_path / "peft")
    nf4 = quantize_linears(copy.deepcopy(base), compute_dtype=torch.bfloat16)
    ours = load_adapter(copy.deepcopy(nf4), tmp_path / "peft")
    assert _sizes(ours) == _sizes(theirs)
    theirs.train()  # bitsandbytes' plain dequantize path on the CPU (no dropout configured, so the same function)
    expected = _logits(theirs, input_ids).float()
    # The same NF4 bytes on both sides, computing in bf16 with different kernels and rounding points; peft runs the
    # LoRA branch in fp32, we in bf16. Observed ~1e-2 (vs an fp32 run on the decoded weights: peft 3e-3, ours 8e-3,
    # as without these options; the bare NF4 bases alone are 3e-3 and 6e-3 off it).
    assert rel_err(_logits(ours, input_ids).float(), expected) < 2e-2
    assert rel_err(_logits(ours, input_ids, grad=True).float(), expected) < 2e-2
    save_adapter(ours, tmp_path / "ours")
    back = peft_from_pretrained(bnb_quantize_linears(copy.deepcopy(base), compute_dtype=torch.bfloat16),
                                 tmp_path / "ours")
    back.train()
    # the same adapter tensors came back: peft's outputs are the same bits
    assert torch.equal(_logits(back, input_ids), _logits(theirs, input_ids))


def test_a_lora_bias_merges_into_the_base_bias_and_unmerges_as_in_peft(input_ids):
    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    spec = SPECS["lora-bias"]
    theirs = peft_model(base, **spec, init_lora_weights=False)
    perturb_trainables(theirs, seed=6)
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**spec))
    _copy_from_peft(theirs, ours)
    unmerged = _logits(ours, input_ids)
    biases = {n: p.clone() for n, p in ours.named_parameters() if n.endswith("base_layer.bias")}
    merge_adapters(ours)
    # fp32: the merged weight and bias are rounded once: ~1e-7.
    assert rel_err(_logits(ours, input_ids), unmerged) < 1e-6
    merged = {n: p.clone() for n, p in ours.named_parameters() if n in biases}
    assert not any(torch.equal(merged[n], biases[n]) for n in merged)
    unmerge_adapters(ours)
    for n, p in ours.named_parameters():
        if n in biases:
            # fp32 (b + s * lora_b) - s * lora_b: one rounding each way, at most an ulp of the merged bias each
            torch.testing.assert_close(p, biases[n], rtol=0, atol=2 * 2 ** -23 * merged[n].abs().max().item())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
    ours_merged = merge_and_unload(ours)
    their_params = dict(their_merged.named_parameters())
    for n, p in ours_merged.named_parameters():
        # peft adds scaling * B @ A in place, we fold it in fp32: one rounding apart
        torch.testing.assert_close(p, their_params[n], rtol=1e-6, atol=1e-7)


def test_a_lora_bias_on_an_nf4_base_merges_into_the_dense_bias(input_ids):
    base = quantize_linears(tiny_llama(bias=True, layers=3, hidden=64, intermediate=96), compute_dtype=torch.float32)
    ours = inject_lora(base, LoraConfig(**SPECS["lora-bias"], init_lora_weights=False))
    perturb_trainables(ours, seed=7)
    unmerged = _logits(ours, input_ids)
    merged = merge_and_unload(ours)
    # fp32 dequantized weights plus the fp32 update in a dense layer: reassociation only.
    assert rel_err(_logits(merged, input_ids), unmerged) < 1e-6


def test_merging_a_lora_bias_into_a_base_without_bias_is_an_error_and_changes_nothing():
    spec = {"r": 2, "target_modules": ["q_proj"], "lora_bias": True, "init_lora_weights": False}
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        peft_model(tiny_llama(layers=3, hidden=64, intermediate=96), **spec).merge_and_unload()
    ours = inject_lora(tiny_llama(layers=3, hidden=64, intermediate=96), LoraConfig(**spec))
    before = {n: p.clone() for n, p in ours.state_dict().items()}
    message = re.escape(
        "model.layers.0.self_attn.q_proj: adapters ['default'] have a LoRA bias (lora_bias=True) and the base layer "
        "has no bias to merge it into; expected a base with a bias, or the adapters left unmerged"
    )
    with pytest.raises(ValueError, match=message):
        merge_adapters(ours)
    with pytest.raises(ValueError, match=message):
        merge_and_unload(ours)
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(layer.merged for _, layer in lora_layers(ours))


def test_a_lora_bias_trains_with_its_adapter_under_every_bias_mode():
    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    for bias in ("none", "all", "lora_only"):
        spec = {"r": 2, "target_modules": ["q_proj"], "lora_bias": True, "bias": bias}
        ours = inject_lora(copy.deepcopy(base), LoraConfig(**spec))
        assert trainable_names(ours) == trainable_names(peft_model(base, **spec)), bias
        assert "model.layers.0.self_attn.q_proj.lora_B.default.bias" in trainable_names(ours)


def test_bias_all_saves_only_this_adapters_lora_bias_as_peft_does():
    from peft import LoraConfig as PeftLoraConfig, get_peft_model_state_dict

    base = tiny_llama(bias=True, layers=3, hidden=64, intermediate=96)
    spec = {"r": 2, "target_modules": ["q_proj"], "lora_bias": True}  # peft allows one adapter with a bias mode
    ours = inject_lora(copy.deepcopy(base), LoraConfig(**spec), "a")
    inject_lora(ours, LoraConfig(**spec, bias="all"), "b")
    theirs = peft_model(base, adapter_name="a", **spec)
    theirs.add_adapter("b", PeftLoraConfig(**spec, bias="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft 0.21 takes a 1-D lora_B.bias for a ZeRO-3 shard and warns
        expected = get_peft_model_state_dict(theirs, adapter_name="b")
    assert adapter_state_dict(ours, "b").keys() == expected.keys()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers_pattern": "layers"}, r"layers_pattern='layers' without layers_to_transform selects nothing"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]},
         r"layers_to_transform=\[0\] needs target_modules as a list of names \(as peft\), got "
         r"target_modules='all-linear'"),
        ({"target_modules": r".*q_proj", "layers_pattern": "layers", "layers_to_transform": 0},
         r"layers_to_transform=0 needs target_modules as a list"),
        ({"lora_bias": True, "use_dora": True}, r"lora_bias=True is not supported with use_dora=True"),
        ({"lora_bias": True, "init_lora_weights": "gaussian"},
         r"lora_bias=True is not supported with use_dora=False, init_lora_weights='gaussian'"),
    ],
    ids=["pattern-without-layers", "layers-all-linear", "layers-regex", "bias-dora", "bias-gaussian"],
)
def test_configs_peft_refuses_are_refused_in_one_line(kwargs, match):
    from peft import LoraConfig as PeftLoraConfig

    spec = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError):
        PeftLoraConfig(**spec)
    with pytest.raises(ValueError, match=match):
        LoraConfig(**spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers_to_transform": -1}, r"layers_to_transform=-1 is not valid; expected None, a layer index >= 0"),
        ({"layers_to_transform": [0, True]}, r"layers_to_transform=\[0, True\] is not valid"),
        ({"layers_to_transform": "0"}, r"layers_to_transform='0' is not valid"),
        ({"layers_to_transform": [0], "layers_pattern": ["layers", ""]}, r"layers_pattern=.* non-empty"),
        ({"layers_to_transform": [0], "layers_pattern": "lay(ers"}, r"layers_pattern='lay\(ers' is not a valid regex"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 is not a valid rank; expected a positive int"),
        ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\]=2.0 is not a valid rank"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\]=nan is not a finite number"),
        ({"alpha_pattern": {"q_(proj": 2}}, r"alpha_pattern key='q_\(proj' is not a valid regex"),
        ({"rank_pattern": ["q_proj"]}, r"rank_pattern=\['q_proj'\] is not a dict"),
        ({"lora_bias": "false"}, r"lora_bias='false' is not a bool"),
    ],
)
def test_invalid_values_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_layer_indices_where_the_targets_have_no_module_are_an_error_that_injects_nothing():
    model = tiny_llama(layers=3, hidden=64, intermediate=96)
    with pytest.raises(ValueError, match=re.escape(
        "layers_to_transform=[0, 7] holds layers [7] where target_modules matches no module; target_modules matches "
        "in layers [0, 1, 2] (read with layers_pattern=None)"
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 7]))
    with pytest.raises(ValueError, match=re.escape(
        "layers_to_transform=[1] holds layers [1] where target_modules matches no module; target_modules matches "
        "in layers [] (read with layers_pattern='layer')"
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layer"))
    assert lora_module_names(model) == set() and not hasattr(model, "lora_configs")


def test_pattern_keys_that_apply_to_no_targeted_module_are_an_error_that_injects_nothing():
    model = tiny_llama(layers=3, hidden=64, intermediate=96)
    with pytest.raises(ValueError, match=re.escape(
        "pattern keys {'rank_pattern': ['k_proj'], 'alpha_pattern': ['proj']} apply to no targeted module; "
        "targeted modules: ['model.layers.0.self_attn.q_proj', "
    )):
        inject_lora(model, LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 3, "k_proj": 4},
                                      alpha_pattern={"proj": 2}))
    assert lora_module_names(model) == set() and not hasattr(model, "lora_configs")


def test_a_peft_adapter_with_entries_that_select_nothing_loads_without_them(tmp_path, input_ids):
    base = tiny_llama(layers=3, hidden=64, intermediate=96)
    spec = {"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0, 7], "rank_pattern": {"k_proj": 4},
            "alpha_pattern": {"q_proj": 3}}
    theirs = peft_model(base, **spec, init_lora_weights=False)
    perturb_trainables(theirs, seed=8)
    _peft_save(theirs, tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    config = ours.lora_configs["default"]
    assert (config.layers_to_transform, config.rank_pattern, config.alpha_pattern) == ([0], {}, {"q_proj": 3})
    # fp32, same weights, same ops up to association order: ~1e-7.
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-6


def test_the_new_options_round_trip_through_the_peft_dict_and_build_the_same_peft_config():
    from peft import LoraConfig as PeftLoraConfig

    ours = LoraConfig(**SPECS["everything"])
    d = ours.to_peft_dict()
    assert LoraConfig.from_peft_dict(json.loads(json.dumps(d))) == ours
    theirs = PeftLoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "revision")})
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "lora_bias"):
        assert getattr(theirs, field) == getattr(ours, field), field


def test_a_layer_built_directly_from_a_config_with_patterns_is_refused():
    with pytest.raises(ValueError, match=re.escape(
        "config has rank_pattern={'q': 4}, alpha_pattern={}; expected config.for_module(<this module's name>)"
    )):
        LoraLinear(torch.nn.Linear(8, 8), "default", LoraConfig(target_modules=["q"], rank_pattern={"q": 4}))
    layer = LoraLinear(torch.nn.Linear(8, 8), "default",
                       LoraConfig(target_modules=["q"], rank_pattern={"q": 4}).for_module("model.q"))
    assert layer.r == {"default": 4}


NESTED_NAMES = ("model.layers.3.mlp.experts.0.up_proj", "model.layers.0.mlp.experts.3.up_proj", "transformer.h.3.up_proj",
                "blocks.3.up_proj", "up_proj")


def _nested_model() -> torch.nn.Module:
    """Linear layers at ``NESTED_NAMES``: layer indices nested, under other list names, and absent."""
    root = torch.nn.Module()
    for name in NESTED_NAMES:
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rpartition(".")[2], torch.nn.Linear(4, 4))
    return root


@pytest.mark.parametrize(
    "layers",
    [{"layers_to_transform": 3}, {"layers_to_transform": [3], "layers_pattern": "experts"},
     {"layers_to_transform": [3], "layers_pattern": ["h", "blocks"]}],
    ids=["first-index", "experts", "h-or-blocks"],
)
def test_the_layer_index_is_read_from_module_names_as_peft_reads_it(layers):
    spec = {"r": 2, "target_modules": ["up_proj"], **layers}
    ours = inject_lora(_nested_model(), LoraConfig(**spec))
    assert lora_module_names(ours) == lora_module_names(peft_model(_nested_model(), **spec))
