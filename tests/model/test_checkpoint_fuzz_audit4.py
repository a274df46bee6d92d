"""Fuzz audit 4 of saving: `save_quantized` / `save_pretrained` and bitsandbytes' 4-bit state dict, live against
transformers 5 + bitsandbytes 0.50 on the CPU. Random tiny Llamas (GQA, tied or not, biases, nf4/fp4, blocksizes
64-256, double quant on or off, compute dtypes, skip lists, sharded re-saves over an existing directory, rows that
are not whole blocks) must give the same files as transformers' own 4-bit save and load back byte for byte both
ways; malformed states must be refused in one line."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from torch import nn

from nf4lora.lora import LoraConfig, inject_lora
from nf4lora.model import load_model, save_pretrained, save_quantized
from nf4lora.nf4 import QuantizedTensor
from nf4lora.nf4.state_dict import from_bnb_state_dict

from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _random_llama(rng: random.Random, **overrides) -> transformers.LlamaForCausalLM:
    """A random tiny transformers Llama: GQA or MHA, tied or not, biases or not, widths that are often not a
    multiple of the blocksize."""
    heads = rng.choice([2, 4, 6])
    config = dict(vocab_size=rng.choice([64, 96, 130]), hidden_size=heads * rng.choice([8, 16, 32]),
                  intermediate_size=rng.choice([48, 100, 128, 200]), num_hidden_layers=rng.choice([1, 2]),
                  num_attention_heads=heads, num_key_value_heads=rng.choice([d for d in (1, 2, 3, 6) if heads % d == 0]),
                  max_position_embeddings=64, tie_word_embeddings=rng.random() < 0.5,
                  attention_bias=rng.random() < 0.3, mlp_bias=rng.random() < 0.3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(rng.randrange(2**31))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()


def _tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory`, each name stored once."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            for key, t in safetensors_torch.load_file(os.path.join(directory, name)).items():
                assert key not in out, f"{key} stored twice"
                out[key] = t
    return out


def _assert_index_describes_shards(directory) -> None:
    """A single model.safetensors with no index beside it, or shards exactly as the index's weight_map says, with
    its total_size the sum of their tensor bytes."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if files == ["model.safetensors"]:
        assert not os.path.exists(index_path)
        return
    with open(index_path) as f:
        index = json.load(f)
    stored = {key: name for name in files
              for key in safetensors_torch.load_file(os.path.join(directory, name))}
    assert index["weight_map"] == stored
    tensors = _tensors(directory)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def _assert_same_files(ours: dict, theirs: dict) -> None:
    """The same keys with identical tensors; a 4-bit linear's bias may differ only by its storage dtype (ours
    keeps it in the compute dtype, transformers in the model's)."""
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:6]
    for key, t in ours.items():
        if key.endswith("proj.bias") and t.dtype != theirs[key].dtype:
            assert torch.equal(t, theirs[key].to(t.dtype)), key
        else:
            assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key


def _assert_transformers_holds_our_weights(ours, theirs) -> int:
    """Each 4-bit linear of `ours` is a bnb Linear4bit in `theirs` with identical packed codes, absmax, quant
    state and compute dtype; each dense one identical; returns the number of 4-bit linears."""
    count = 0
    for name, module in ours.named_modules():
        other = theirs.get_submodule(name) if name else theirs
        if isinstance(getattr(module, "weight", None), QuantizedTensor):
            state, their_state = module.weight.state, other.weight.quant_state
            assert isinstance(other, bnb.nn.Linear4bit), name
            assert torch.equal(other.weight.data.view(-1), module.weight.packed), name
            assert torch.equal(their_state.absmax, state.absmax), name
            assert (their_state.blocksize, their_state.quant_type, their_state.dtype, tuple(their_state.shape)) == (
                state.blocksize, state.quant_type, state.dtype, tuple(state.shape)), name
            assert (their_state.state2 is not None) == state.double_quant, name
            assert other.compute_dtype == module.compute_dtype, name
            count += 1
        elif isinstance(module, nn.Linear):
            assert type(other) is nn.Linear and torch.equal(other.weight, module.weight.to(other.weight.dtype)), name
    return count


def _round_trip_case(rng: random.Random, root) -> None:
    source = root / "source"
    _random_llama(rng).save_pretrained(source)
    quant_type, blocksize, double_quant = rng.choice(["nf4", "fp4"]), rng.choice([64, 128, 256]), rng.random() < 0.5
    dtype, compute_dtype = rng.choice(list(DTYPES)), rng.choice(list(DTYPES))
    skip = rng.choice([["lm_head"], ["lm_head", "down_proj"], [], ["lm_head", "model.layers.0.self_attn.k_proj"]])
    ours = load_model(source, quantization=quant_type, blocksize=blocksize, double_quant=double_quant,
                      compute_dtype=compute_dtype, dtype=dtype, skip_modules=skip)
    saved = root / "ours"
    saved.mkdir()
    (saved / "tokenizer.model").write_bytes(b"kept")
    for max_shard_bytes in (rng.choice([None, 1, 3000]), rng.choice([None, 1, 5000, 50000])):  # re-save over it
        save_quantized(ours, saved, max_shard_bytes=max_shard_bytes)
    assert (saved / "tokenizer.model").read_bytes() == b"kept"
    _assert_index_describes_shards(saved)
    with open(saved / "config.json") as f:
        fields = json.load(f)["quantization_config"]
    assert (fields["bnb_4bit_quant_type"], fields["bnb_4bit_use_double_quant"], fields["bnb_4bit_compute_dtype"]) == (
        quant_type, double_quant, compute_dtype)
    files = _tensors(saved)
    save_quantized(load_model(saved, dtype=dtype), root / "again")
    assert_same = _assert_same_files
    assert_same(_tensors(root / "again"), files)
    theirs = transformers.LlamaForCausalLM.from_pretrained(saved, device_map="cpu", dtype=DTYPES[dtype]).eval()
    assert _assert_transformers_holds_our_weights(ours, theirs) > 0
    if blocksize == 64:  # the only blocksize transformers quantizes with
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=double_quant,
                                                 bnb_4bit_compute_dtype=DTYPES[compute_dtype],
                                                 llm_int8_skip_modules=skip)
        transformers.LlamaForCausalLM.from_pretrained(source, device_map="cpu", dtype=DTYPES[dtype],
                                                      quantization_config=config).save_pretrained(root / "bnb")
        assert_same(files, _tensors(root / "bnb"))


def test_random_save_quantized_files_equal_transformers_and_load_back_both_ways(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for case in range(4):
        root = tmp_path / str(case)
        root.mkdir()
        try:
            _round_trip_case(rng, root)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, case {case}: {e}") from e


@pytest.mark.parametrize("double_quant", [False, True])
def test_an_empty_4bit_weight_from_bitsandbytes_is_refused_in_one_line(double_quant):
    # bitsandbytes quantizes a (0, k) weight (and writes nested_offset NaN with double quantization); our quantize
    # refuses empty weights, and the state's finiteness check raised torch's RuntimeError on max() of nothing
    columns = random.randint(1, 300)
    packed, state = bnb.functional.quantize_4bit(torch.zeros(0, columns), blocksize=64, quant_type="nf4",
                                                 compress_statistics=double_quant)
    state_dict = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ValueError, match=rf"'weight.quant_state.bitsandbytes__nf4' has shape \[0, {columns}\], "
                                         rf"which holds no elements; valid: a shape with at least one element") as error:
        from_bnb_state_dict(state_dict, "weight")
    _assert_one_line(error)


@pytest.fixture
def lora_model(tmp_path):
    _random_llama(random.Random(), tie_word_embeddings=False).save_pretrained(tmp_path / "source")
    return tmp_path / "source"


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_saving_a_model_with_lora_layers_is_refused_and_writes_nothing(lora_model, tmp_path, quantization):
    # saved before: a checkpoint of `...q_proj.base_layer.weight` and `lora_A` keys that neither load_model nor
    # transformers can read ("checkpoint has N tensor(s) the config does not use")
    model = load_model(lora_model, quantization=quantization, dtype=torch.float32)
    inject_lora(model, LoraConfig(r=random.choice([2, 4]), lora_alpha=8, target_modules=random.choice(
        ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])))
    save = save_quantized if quantization else save_pretrained
    with pytest.raises(ValueError, match=r"has \d+ tensor\(s\) that a Llama checkpoint has no place for, e\.g\. "
                                         r"\['model\.layers\.0\..*(base_layer|lora_A).*valid: merge the adapters "
                                         r"first \(merge_and_unload\) or save them apart \(save_adapter\)") as error:
        save(model, tmp_path / "out")
    _assert_one_line(error)
    assert not (tmp_path / "out").exists()


def test_saving_into_a_path_that_is_a_file_is_refused_in_one_line(lora_model, tmp_path):
    target = tmp_path / random.choice(["model", "out.safetensors"])
    target.write_bytes(b"not a directory")
    with pytest.raises(ValueError, match=rf"{target} is a file; valid: a directory \(new or existing\) to write the "
                                         rf"checkpoint into") as error:
        save_quantized(load_model(lora_model, quantization="nf4"), target)
    _assert_one_line(error)
    assert target.read_bytes() == b"not a directory"
