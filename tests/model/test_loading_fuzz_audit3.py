"""Fuzz audit 3 of checkpoint loading against transformers 5 + bitsandbytes: directories transformers itself leaves
behind (a single file beside a stale shard index), tensors stored twice (in two shards, or twice in one header), and
skip_modules matched as transformers' llm_int8_skip_modules are matched."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.model import load_model
from nf4lora.nf4 import QuantizedTensor
from nf4lora.nf4.state_dict import to_bnb_state_dict

from .conftest import hf_model, rel_err
from .test_llama import FP32_REL, _ids
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


def _from_pretrained(path, **kwargs):
    return transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs).eval()


def _assert_logits_match_transformers(path) -> None:
    reference = _from_pretrained(path, dtype=torch.float32)
    ours = load_model(path, dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        assert rel_err(ours(x), reference(x).logits) < FP32_REL


def test_a_single_file_beside_a_stale_shard_index_loads_as_transformers_loads_it(tmp_path):
    # transformers' save_pretrained, sharded then unsharded into one directory, removes the shards but leaves the
    # index; from_pretrained reads model.safetensors first. We read the index first and refused the directory
    # ("names shard(s) ... that are missing").
    model = hf_model()
    model.save_pretrained(tmp_path, max_shard_size=random.choice(["5KB", "20KB", "60KB"]))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(os.listdir(tmp_path))
    _assert_logits_match_transformers(tmp_path)
    assert torch.equal(load_model(tmp_path, dtype=torch.float32).model.norm.weight, model.model.norm.weight)


@pytest.fixture
def sharded(tmp_path):
    """(directory, weight_map) of a transformers-saved 3-layer checkpoint in a random number of shards."""
    hf_model(num_hidden_layers=3).save_pretrained(tmp_path, max_shard_size=random.choice(["5KB", "20KB", "60KB"]))
    with open(tmp_path / "model.safetensors.index.json") as f:
        return tmp_path, json.load(f)["weight_map"]


def test_random_shards_with_a_shuffled_index_and_a_stale_inv_freq_match_transformers(sharded):
    path, weight_map = sharded
    shard = random.choice(sorted(set(weight_map.values())))
    tensors = load_file(path / shard)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)  # older transformers saved it
    save_file(tensors, path / shard, metadata={"format": "pt"})
    items = [*weight_map.items(), ("model.layers.0.self_attn.rotary_emb.inv_freq", shard)]
    random.shuffle(items)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict(items)}))
    _assert_logits_match_transformers(path)


@pytest.mark.parametrize("index_names", ["first", "second"])
def test_a_tensor_stored_in_two_shards_is_refused_naming_both(sharded, index_names):
    # the later shard's copy silently won (as in transformers); when the index named the earlier shard the error
    # said that shard did not contain the tensor
    path, weight_map = sharded
    shards = sorted(set(weight_map.values()))
    # the key's own shard keeps another tensor, so the index still lists it when it names the other copy
    first = random.choice([s for s in shards if sum(v == s for v in weight_map.values()) >= 2])
    second = random.choice([s for s in shards if s != first])
    key = random.choice([k for k, s in weight_map.items() if s == first])
    tensors = load_file(path / second)
    tensors[key] = load_file(path / first)[key] + 1.0
    save_file(tensors, path / second, metadata={"format": "pt"})
    weight_map[key] = first if index_names == "first" else second
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    read_first, read_second = sorted([first, second])  # the shards are read in sorted order
    message = (rf"model.safetensors.index.json: tensor '{re.escape(key)}' is stored in both .*{read_first} and "
               rf".*{read_second}")
    with pytest.raises(ValueError, match=message) as error:
        load_model(path)
    _assert_one_line(error)


@pytest.mark.parametrize("same_entry", [True, False])
def test_a_header_listing_a_tensor_twice_is_refused(checkpoints, tmp_path, same_entry):
    # json.loads kept the last entry: an identical duplicate loaded silently, a different one was reported as a
    # shape that does not fit the config
    path = shutil.copytree(checkpoints("gqa"), tmp_path / "m")
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    key = random.choice(sorted(k for k in header if k != "__metadata__"))
    entry = dict(header[key])
    if not same_entry:
        entry["dtype"], entry["shape"] = "BF16", [entry["shape"][0] * 2, *entry["shape"][1:]]
    text = raw[8:8 + n].decode().rstrip()[:-1] + f", {json.dumps(key)}: {json.dumps(entry)}}}"
    weights.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    with pytest.raises(ValueError, match=rf"model.safetensors: corrupt safetensors header: '{re.escape(key)}' is "
                                         rf"listed twice; valid: each tensor once") as error:
        load_model(path)
    _assert_one_line(error)


@pytest.mark.parametrize("skip", [
    ["lm_head", "proj"],  # plain suffixes, not only whole name parts: every *_proj stays dense
    ["lm_head", "_proj"],
    ["lm_head", r"model\.layers\.\d+\.self_attn\.(q|v)_proj"],  # a regex
    ["model.layers.1", "wn_proj"],  # layer 1 (not 11) at a module boundary; the head quantized
    ["lm_head", "o_proj", "model.layers.0.mlp"],
])
def test_skip_modules_are_matched_as_transformers_matches_llm_int8_skip_modules(checkpoints, skip):
    # we matched only whole names, ".name" suffixes and "name." prefixes: "proj" or a regex skipped nothing, so
    # layers transformers keeps dense were quantized
    path = checkpoints("gqa")
    quant_type, double_quant = random.choice(["nf4", "fp4"]), random.choice([True, False])
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    hf = _from_pretrained(path, quantization_config=config, dtype=torch.float32)
    ours = load_model(path, quantization=quant_type, double_quant=double_quant, dtype=torch.float32,
                      skip_modules=tuple(skip))
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear) or isinstance(getattr(module, "weight", None), QuantizedTensor):
            theirs = hf.get_submodule(name)
            assert isinstance(module.weight, QuantizedTensor) == isinstance(theirs, bnb.nn.Linear4bit), name
            if isinstance(theirs, bnb.nn.Linear4bit):
                state = {f"w.{k}": v for k, v in theirs.weight.quant_state.as_dict(packed=True).items()}
                state["w"] = theirs.weight.data
                got = to_bnb_state_dict(module.weight, "w")
                assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in got), name


def test_a_skip_module_that_is_not_a_regex_is_refused_naming_it(checkpoints):
    with pytest.raises(ValueError, match=r"^skip_modules entry 'lm_head\[' is not a module name or regular "
                                         r"expression \(.*\); valid: ") as error:
        load_model(checkpoints("gqa"), quantization="nf4", skip_modules=("lm_head[",))
    _assert_one_line(error)


@pytest.mark.parametrize("skip", [None, 3, {"lm_head": 1}])
def test_skip_modules_that_are_no_list_of_names_are_refused_in_one_line(skip):
    from nf4lora.model.loading import LoadOptions

    with pytest.raises(ValueError, match=r"skip_modules=.* is not a list of names; valid: a name, or a list"):
        LoadOptions(skip_modules=skip)
