"""Adapter files against peft, fuzzed on a Llama that both load from the same safetensors checkpoint: bias modes
shared by two adapters, adapters saved while merged, and the files load_adapter must refuse in one line."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lora_helpers import peft_from_pretrained, peft_model, perturb_trainables, rel_err, tiny_llama
from nf4lora.lora import LoraConfig, inject_lora, load_adapter, merge_adapters, save_adapter, set_adapter
from nf4lora.model.loading import load_model

WEIGHTS = "adapter_model.safetensors"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers Llama with biases, the directory it is saved in as safetensors)."""
    hf = tiny_llama(bias=True, seed=random.randrange(1000))
    directory = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, directory


def _ours(checkpoint):
    """nf4lora's Llama in fp32, loaded from the checkpoint's safetensors."""
    return load_model(checkpoint[1], dtype=torch.float32)


def _logits(model, input_ids):
    with torch.no_grad():
        out = model.eval()(input_ids)
    return getattr(out, "logits", out)


def _random_config(rng: random.Random, **fixed) -> dict:
    """A peft LoraConfig's arguments: r, alpha, rsLoRA, targets as a list or a regex, rank/alpha patterns."""
    targets = rng.sample(PROJ, rng.randint(1, 3))
    spec = {"r": rng.randint(1, 5), "lora_alpha": rng.choice([1, 4, 6.5, 16]), "use_rslora": rng.random() < 0.5,
            "target_modules": targets if rng.random() < 0.5 else rf".*\.({'|'.join(targets)})",
            "init_lora_weights": False}
    if rng.random() < 0.5:
        spec["rank_pattern"] = {targets[0]: rng.randint(1, 5)}
        spec["alpha_pattern"] = {f"model.layers.{rng.randint(0, 1)}.*": rng.choice([2, 9.5])}
    return {**spec, **fixed}


@pytest.mark.parametrize("second_bias", ["all", "lora_only"])
def test_a_second_adapter_with_a_bias_mode_is_refused_as_peft_refuses_it(checkpoint, second_bias, tmp_path):
    """Both would load the base biases: loading the second silently changed the first's outputs (rel. err 0.4)."""
    rng = random.Random()
    input_ids = torch.randint(0, 97, (2, 9))
    first = inject_lora(_ours(checkpoint), LoraConfig(**_random_config(rng, bias=rng.choice(["all", "lora_only"]))))
    perturb_trainables(first, seed=rng.randrange(100))
    save_adapter(first, tmp_path / "first")
    second = inject_lora(_ours(checkpoint), LoraConfig(**_random_config(rng, bias=second_bias)))
    perturb_trainables(second, seed=rng.randrange(100))
    save_adapter(second, tmp_path / "second")
    model = load_adapter(_ours(checkpoint), tmp_path / "first", "first")
    refusal = f"bias={second_bias!r} for a second adapter with a bias mode (adapter 'first' has bias="
    with pytest.raises(ValueError, match=re.escape(refusal)):
        load_adapter(model, tmp_path / "second", "second")
    assert list(model.lora_configs) == ["first"]
    # fp32, the same weights and ops: equal up to association order.
    assert rel_err(_logits(model, input_ids), _logits(first, input_ids)) < 1e-5
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        peft_from_pretrained(checkpoint[0], tmp_path / "first").load_adapter(tmp_path / "second", "second")
    set_adapter(model, "first")  # a bias-free second adapter is fine, as in peft
    inject_lora(model, LoraConfig(**_random_config(rng)), "plain")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_an_adapter_saved_while_merged_with_a_lora_bias_reloads_with_its_outputs(checkpoint, bias, tmp_path):
    """The merged LoRA bias sits in the base bias: it was saved there and added again on load (rel. err 1e-2)."""
    rng = random.Random()
    input_ids = torch.randint(0, 97, (2, 9))
    ours = inject_lora(_ours(checkpoint), LoraConfig(**_random_config(rng, bias=bias, lora_bias=True)))
    perturb_trainables(ours, seed=rng.randrange(100))
    expected = _logits(ours, input_ids)
    merge_adapters(ours)
    save_adapter(ours, tmp_path)
    # fp32; the bias goes through one merge and unmerge rounding (~1e-7).
    assert rel_err(_logits(load_adapter(_ours(checkpoint), tmp_path), input_ids), expected) < 1e-5
    assert rel_err(_logits(peft_from_pretrained(checkpoint[0], tmp_path), input_ids), expected) < 1e-5


def _saved_adapter(checkpoint, directory, **fixed):
    """Save a random adapter of nf4lora's Llama to ``directory``; returns its file's tensors."""
    rng = random.Random()
    ours = inject_lora(_ours(checkpoint), LoraConfig(**_random_config(rng, **fixed)))
    perturb_trainables(ours, seed=rng.randrange(100))
    save_adapter(ours, directory)
    return load_file(directory / WEIGHTS)


def _refusal(checkpoint, directory) -> str:
    """load_adapter's one-line error for ``directory``; the model must be left without adapters."""
    model = _ours(checkpoint)
    with pytest.raises(ValueError) as info:
        load_adapter(model, directory)
    assert not hasattr(model, "lora_configs")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_keys_that_hold_the_adapter_name_are_listed_as_unexpected_not_as_base_weights(checkpoint, tmp_path):
    """``...lora_A.default.weight`` names a parameter of the injected model: it was reported as a base weight that
    differs from the model's, or dropped when it equalled it (a zero B)."""
    tensors = _saved_adapter(checkpoint, tmp_path)
    renamed = {re.sub(r"\.(lora_[AB])\.", r".\1.default.", k): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS)
    message = _refusal(checkpoint, tmp_path)
    assert "does not fit the model: missing keys ['base_model.model." in message
    unexpected = message.split("unexpected keys ")[1]
    assert re.search(r"\.lora_[AB]\.default\.weight", unexpected), message
    assert f"and {len(renamed) - 4} more" in unexpected or len(renamed) <= 4


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int64])
def test_a_tensor_that_is_not_floating_is_refused(checkpoint, tmp_path, dtype):
    """An integer or bool tensor was cast into the LoRA weight without a word."""
    tensors = _saved_adapter(checkpoint, tmp_path)
    key = random.choice(sorted(tensors))
    tensors[key] = (tensors[key] * 10).to(dtype)
    save_file(tensors, tmp_path / WEIGHTS)
    assert _refusal(checkpoint, tmp_path).endswith(
        f"{WEIGHTS}: key {key} has dtype {dtype}, expected a floating dtype such as torch.float32")


def test_a_pickled_adapter_bin_is_refused_naming_it(checkpoint, tmp_path):
    tensors = _saved_adapter(checkpoint, tmp_path)
    (tmp_path / WEIGHTS).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")  # what peft writes with safe_serialization=False
    assert "(it holds adapter_model.bin, a pickle, which nf4lora does not load: re-save it with peft's " \
           "safe_serialization=True)" in _refusal(checkpoint, tmp_path)


def test_keys_without_peft_prefix_give_a_bounded_error_naming_the_prefix(checkpoint, tmp_path):
    """Every key missing made an error line as long as the adapter's key list (tens of KB for a 7B model)."""
    tensors = _saved_adapter(checkpoint, tmp_path, target_modules=PROJ)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, tmp_path / WEIGHTS)
    message = _refusal(checkpoint, tmp_path)
    assert "does not fit the model (no key starts with peft's prefix 'base_model.model.'): missing keys [" in message
    assert f"and {len(tensors) - 4} more, unexpected keys [" in message
    assert len(message) < 1200, len(message)


@pytest.mark.parametrize("option", [("target_parameters", []), ("layer_replication", []),
                                    ("trainable_token_indices", {}), ("megatron_config", {})])
def test_peft_options_left_empty_are_inert(checkpoint, tmp_path, option):
    """peft tests these options for truth; an empty one was refused as "not supported"."""
    _saved_adapter(checkpoint, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, option[0]: option[1]}))
    input_ids = torch.randint(0, 97, (2, 9))
    # fp32, same weights, same ops up to association order: ~1e-7, with rare draws past 1e-6 (a wrong op: >= 1e-3).
    assert rel_err(_logits(load_adapter(_ours(checkpoint), tmp_path), input_ids),
                   _logits(peft_from_pretrained(checkpoint[0], tmp_path), input_ids)) < 1e-5


def test_random_adapters_round_trip_with_peft_on_a_llama_loaded_from_safetensors(checkpoint, tmp_path):
    """Either direction, a random config: nf4lora's Llama with the adapter gives peft's logits."""
    rng = random.Random()
    input_ids = torch.randint(0, 97, (2, 9))
    spec = _random_config(rng, bias=rng.choice(["none", "lora_only", "all"]))
    theirs = peft_model(checkpoint[0], **spec)
    perturb_trainables(theirs, seed=rng.randrange(100))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(_ours(checkpoint), tmp_path / "peft")
    # fp32, same weights, same ops up to association order: ~1e-7, with rare draws past 1e-6 (a wrong op: >= 1e-3).
    assert rel_err(_logits(ours, input_ids), _logits(theirs, input_ids)) < 1e-5, spec
    perturb_trainables(ours, seed=rng.randrange(100))
    save_adapter(ours, tmp_path / "ours")
    back = peft_from_pretrained(checkpoint[0], tmp_path / "ours")
    assert rel_err(_logits(back, input_ids), _logits(ours, input_ids)) < 1e-5, spec
    saved, loaded = load_file(tmp_path / "ours" / WEIGHTS), get_peft_model_state_dict(back)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
