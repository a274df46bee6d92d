"""Fuzz audit 4 of where and how load_model loads: hub ids resolved offline from a cache laid out as
huggingface_hub lays it out, local paths (`~`, relative, a file), the quantization options against transformers'
BitsAndBytesConfig (+ bitsandbytes 4-bit on the CPU), and the dtype / device arguments and unknown options."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil

import pytest
import torch
from torch import nn

from nf4lora.model import load_model
from nf4lora.nf4 import QuantizedTensor
from nf4lora.nf4.state_dict import to_bnb_state_dict

from .conftest import hf_model
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """A transformers-saved checkpoint stored in float16, with config.json's dtype float16."""
    path = tmp_path_factory.mktemp("fp16") / "m"
    hf_model(num_hidden_layers=1).half().save_pretrained(path)
    return str(path)


def _hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _add_snapshot(cache, repo_id: str, source: str, revision: str, files=None) -> None:
    """Files of `source` as huggingface_hub caches them: content-addressed blobs, a snapshot of relative links to
    them, and refs/main naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in files or os.listdir(source):
        data = open(os.path.join(source, name), "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def _revision() -> str:
    return "".join(random.choices("0123456789abcdef", k=40))


def _embedding(model) -> torch.Tensor:
    return model.model.embed_tokens.weight


def test_a_hub_id_loads_the_snapshot_refs_main_names_from_a_linked_cache(monkeypatch, tmp_path, checkpoints):
    cache = _hub_cache(monkeypatch, tmp_path)
    old, new = _revision(), _revision()
    _add_snapshot(cache, "org/tiny", checkpoints("gqa"), old, files=["config.json"])  # an older, partial snapshot
    _add_snapshot(cache, "org/tiny", checkpoints("gqa"), new)
    assert torch.equal(_embedding(load_model("org/tiny")), _embedding(load_model(checkpoints("gqa"))))
    (cache / "models--org--tiny" / "refs" / "main").write_text(old)
    with pytest.raises(FileNotFoundError, match=rf"snapshots/{old} has neither model.safetensors"):
        load_model("org/tiny")


@pytest.mark.parametrize("repo_id", ["org/missing", "tiny"])
def test_a_hub_id_missing_from_the_cache_offline_is_one_line(monkeypatch, tmp_path, checkpoints, repo_id):
    _add_snapshot(_hub_cache(monkeypatch, tmp_path), "org/tiny", checkpoints("gqa"), _revision())
    with pytest.raises(FileNotFoundError, match=rf"^'{repo_id}' is not a local directory, and as a hub id it is "
                                                r"not in the local Hugging Face cache .*HF_HUB_OFFLINE") as error:
        load_model(repo_id)
    _assert_one_line(error)


def test_a_local_directory_named_like_a_hub_id_wins_over_the_cache(monkeypatch, tmp_path, checkpoints):
    cache = _hub_cache(monkeypatch, tmp_path)
    _add_snapshot(cache, "org/tiny", checkpoints("tied"), _revision())
    shutil.copytree(checkpoints("gqa"), tmp_path / "cwd" / "org" / "tiny")
    monkeypatch.chdir(tmp_path / "cwd")
    assert torch.equal(_embedding(load_model("org/tiny")), _embedding(load_model(checkpoints("gqa"))))
    assert torch.equal(_embedding(load_model("./org/tiny")), _embedding(load_model(checkpoints("gqa"))))


def test_a_path_under_home_is_expanded(monkeypatch, tmp_path, checkpoints):
    # "~/m" was neither expanded nor a hub id: "model directory ~/m does not exist" of a directory that exists
    _hub_cache(monkeypatch, tmp_path)
    shutil.copytree(checkpoints("gqa"), tmp_path / "home" / "m")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert torch.equal(_embedding(load_model("~/m")), _embedding(load_model(checkpoints("gqa"))))
    with pytest.raises(FileNotFoundError, match=rf"model directory {re.escape(str(tmp_path))}/home/nope does not"):
        load_model("~/nope")


def test_a_file_instead_of_a_directory_is_named(checkpoints):
    path = os.path.join(checkpoints("gqa"), random.choice(["config.json", "model.safetensors"]))
    with pytest.raises(ValueError, match=rf"^{re.escape(path)} is a file; pass the model directory that holds config.json$"):
        load_model(path)


@pytest.mark.parametrize(("option", "value"), [
    ("double_quant", "no"), ("double_quant", 1), ("double_quant", None),
    ("gradient_checkpointing", "yes"), ("gradient_checkpointing", 0),
])
def test_a_flag_that_is_not_a_bool_is_refused(checkpoints, option, value):
    # bool("no") is True: double_quant="no" double-quantized, silently
    with pytest.raises(ValueError, match=rf"^{option}={value!r} is not a bool; valid: True, False$") as error:
        load_model(checkpoints("gqa"), quantization=random.choice(["nf4", "fp4"]), **{option: value})
    _assert_one_line(error)


@pytest.mark.parametrize("blocksize", [0, 65, "64", 64.0, 8192])
def test_a_bad_blocksize_is_refused_also_for_a_dense_load(checkpoints, blocksize):
    with pytest.raises(ValueError, match=rf"^blocksize {blocksize!r} is not supported; valid: powers of two 32"):
        load_model(checkpoints("gqa"), blocksize=blocksize)


@pytest.mark.parametrize("compute_dtype", ["int8", torch.float64, "auto"])
def test_a_bad_compute_dtype_is_refused_naming_the_option(checkpoints, compute_dtype):
    with pytest.raises(ValueError, match=rf"^compute_dtype {compute_dtype!r} is not supported; valid: \['bf16'"):
        load_model(checkpoints("gqa"), quantization="nf4", compute_dtype=compute_dtype)


def test_random_options_quantize_the_modules_transformers_quantizes_bit_for_bit(checkpoints):
    path = checkpoints(random.choice(["gqa", "mha_bias"]))
    quant_type, double_quant = random.choice(["nf4", "fp4"]), random.choice([True, False])
    dtype, compute_dtype = (random.choice([torch.float32, torch.bfloat16, torch.float16]) for _ in range(2))
    names = ["lm_head", "proj", "q_proj", "mlp", "model.layers.1", "nothing_matches", "embed_tokens", "norm"]
    skip = random.sample(names, random.randint(0, 3))
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                       device_map="cpu")
    ours = load_model(path, quantization=quant_type, double_quant=double_quant, dtype=dtype,
                      compute_dtype=str(compute_dtype), skip_modules=skip)
    for name, module in ours.named_modules():
        theirs = hf.get_submodule(name)
        if isinstance(getattr(module, "weight", None), QuantizedTensor):
            assert isinstance(theirs, bnb.nn.Linear4bit) and module.compute_dtype == theirs.compute_dtype, name
            state = {f"w.{k}": v for k, v in theirs.weight.quant_state.as_dict(packed=True).items()}
            got = to_bnb_state_dict(module.weight, "w")
            assert all(torch.equal(got[k], state[k]) for k in state) and torch.equal(got["w"], theirs.weight.data)
        elif isinstance(module, nn.Linear):
            assert type(theirs) is nn.Linear and torch.equal(module.weight, theirs.weight), name


def test_dtype_auto_is_the_configs_dtype_else_the_checkpoints(fp16_checkpoint, tmp_path):
    # "auto" was refused ("dtype 'auto' is not supported"); transformers reads config.json's dtype
    reference = transformers.LlamaForCausalLM.from_pretrained(fp16_checkpoint, dtype="auto")
    ours = load_model(fp16_checkpoint, dtype="auto")
    assert _embedding(ours).dtype == _embedding(reference).dtype == torch.float16
    assert torch.equal(_embedding(ours), _embedding(reference))
    path = shutil.copytree(fp16_checkpoint, tmp_path / "m")
    _edit_config(path, dtype="float64")
    with pytest.raises(ValueError, match=r"^dtype='auto' resolves to 'float64' \(.*config.json's dtype\); valid: "):
        load_model(path, dtype="auto")
    _edit_config(path, dtype=None)
    assert _embedding(load_model(path, dtype="auto", quantization="nf4")).dtype == torch.float16  # the tensors'


def _edit_config(path, **changes) -> None:
    import json

    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(changes)
    config.pop("torch_dtype", None)
    json.dump(config, open(config_path, "w"))


@pytest.mark.parametrize("dtype", [torch.float16, "float16", "torch.float16", "fp16"])
def test_dtype_as_a_torch_dtype_or_a_name_loads_the_same(fp16_checkpoint, dtype):
    assert _embedding(load_model(fp16_checkpoint, dtype=dtype)).dtype == torch.float16


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", torch.device("meta")])
def test_a_device_the_loader_does_not_place_tensors_on_is_refused(checkpoints, device):
    # meta loaded nothing ("checkpoint lacks 21 tensor(s)"); mps / xpu raised torch's own errors mid-load
    with pytest.raises(ValueError, match=rf"^device='{device}' is not supported; valid: 'cpu', 'cuda'") as error:
        load_model(checkpoints("gqa"), device=device)
    _assert_one_line(error)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), "cuda:1"])
def test_cuda_without_cuda_is_one_line(checkpoints, device):
    with pytest.raises(ValueError, match=r"but 0 CUDA device\(s\) are visible; valid: 'cpu', 'auto'$") as error:
        load_model(checkpoints("gqa"), device=device)
    _assert_one_line(error)


def test_device_and_device_map(checkpoints):
    path = checkpoints("gqa")
    for kwargs in ({"device": torch.device("cpu")}, {"device_map": "auto"}, {"device_map": torch.device("cpu")},
                   {"device": "cpu", "device_map": "cpu"}):
        assert {p.device.type for p in load_model(path, **kwargs).parameters()} == {"cpu"}, kwargs
    # device_map silently won over a device that said otherwise
    with pytest.raises(ValueError, match=r"^device='cuda' and device_map='cpu' disagree; valid: pass one"):
        load_model(path, device="cuda", device_map="cpu")
    with pytest.raises(ValueError, match=r"^device_map=\{'': 'cpu'\} is not a device; valid: 'cpu'"):
        load_model(path, device_map={"": "cpu"})


@pytest.mark.parametrize("options", [{"quant_storage": torch.bfloat16}, {"trust_remote_code": True, "blocksze": 64}])
def test_unknown_options_are_named_with_the_valid_ones(checkpoints, options):
    with pytest.raises(TypeError, match=rf"unknown option\(s\) {sorted(options)!r}".replace("[", r"\[")
                       + r"; valid: \['blocksize', 'double_quant'"):
        load_model(checkpoints("gqa"), **options)
