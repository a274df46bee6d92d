"""Audit of nf4lora.model: inputs that used to crash deep inside or go silently wrong, each against the behaviour
promised (transformers' where it applies, else a one-line error naming the bad value and the valid ones)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from nf4lora.model import generate, load_model, load_tokenizer

from .conftest import hf_model
from .test_loading import _hub_cache

VOCAB = 96  # conftest.BASE


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints("gqa"), dtype=torch.float32)


def _random_rows(n: int, seed: int) -> list[list[int]]:
    """n prompts of distinct random lengths 1..8 over non-special ids."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for length in rng.sample(range(1, 9), n)]


def _assert_one_line(error: pytest.ExceptionInfo) -> None:
    """One line, and no chained exception printed above it."""
    assert "\n" not in str(error.value)
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_mixed_lengths_pad_with_an_id_outside_the_vocabulary(model):
    # generate promises pad_id need not be a vocabulary id: it only fills slots the model never reads
    rows = _random_rows(3, seed=random.randrange(10**6))
    reference = generate(model, rows, max_new_tokens=5, pad_id=0, eos_ids=())
    got = generate(model, rows, max_new_tokens=5, pad_id=-1, eos_ids=())
    width = max(map(len, rows))
    assert int((got[:, :width] == -1).sum()) == 3 * width - sum(map(len, rows))  # the padding, and nothing else
    assert torch.equal(got.masked_fill(got == -1, 0), reference)


def test_a_flat_token_list_is_one_prompt(model):
    # a 1-D tensor is one prompt, so is the list `tokenizer.encode` returns
    row = _random_rows(1, seed=random.randrange(10**6))[0]
    assert torch.equal(generate(model, row, max_new_tokens=4, eos_ids=()),
                       generate(model, [row], max_new_tokens=4, eos_ids=()))


@pytest.mark.parametrize(("prompts", "mask", "message"), [
    pytest.param([[5, VOCAB]], None, rf"token id {VOCAB} is out of range; valid: 0 to {VOCAB - 1}", id="id>=vocab"),
    pytest.param([[5, -3, 7]], None, rf"token id -3 is out of range; valid: 0 to {VOCAB - 1}", id="negative-id"),
    pytest.param(torch.zeros(1, 0, dtype=torch.long), None, r"prompt row\(s\) \[0\] are empty", id="empty-tensor"),
    pytest.param([[5, 6], []], None, r"prompt row\(s\) \[1\] are empty", id="empty-list-row"),
    pytest.param(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]), r"prompt row\(s\) \[1\] are empty",
                 id="all-padding-row"),
    pytest.param(torch.tensor([[5, 6, 7], [7, 8, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                 r"row\(s\) \[1\] end in padding; .* pad on the left", id="right-padding"),
    pytest.param(torch.tensor([[5.0, 6.0]]), None, r"prompts must hold integer token ids, got torch.float32",
                 id="float-tensor"),
    pytest.param(torch.zeros(1, 1, 2, dtype=torch.long), None, r"prompts must be \(batch, seq\) or \(seq,\), got "
                 r"shape \(1, 1, 2\)", id="3d-tensor"),
    pytest.param(["hello"], None, r"prompts must be token ids .* got \['hello'\]", id="text-not-ids"),
])
def test_prompts_generate_cannot_continue_are_refused(model, prompts, mask, message):
    with pytest.raises(ValueError, match=message) as error:
        generate(model, prompts, attention_mask=mask, max_new_tokens=3)
    _assert_one_line(error)


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(max_new_tokens=3.0), dict(max_new_tokens=True),
                                 dict(top_k=2.5, temperature=1.0), dict(top_p=float("nan"), temperature=1.0)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_bad_sampling_arguments_are_named(model, bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=rf"need max_new_tokens >= 1 .*; got .*{name}={value!r}") as error:
        generate(model, [[5, 6]], **{"max_new_tokens": 3, **bad})
    _assert_one_line(error)


def test_eos_ids_may_be_a_tensor(model):
    rows = _random_rows(2, seed=random.randrange(10**6))
    free = generate(model, rows, max_new_tokens=6, eos_ids=())
    stop = int(free[0, -6])  # row 0's first new token
    assert torch.equal(generate(model, rows, max_new_tokens=6, eos_ids=torch.tensor(stop)),
                       generate(model, rows, max_new_tokens=6, eos_ids=stop))


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_forward_refuses_token_ids_outside_the_vocabulary(model, bad_id):
    ids = torch.randint(0, VOCAB, (2, 5))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range; valid: 0 to {VOCAB - 1}") as error:
        model(ids)
    _assert_one_line(error)


def test_default_stop_ids_come_from_generation_config_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 6))
    free = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    # generation_config.json adds row 0's third new token as a stop id, and a pad id config.json lacks
    gen_config = {"bos_token_id": 1, "eos_token_id": [2, int(free[0, 8])], "pad_token_id": 4}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen_config))
    expected = transformers.LlamaForCausalLM.from_pretrained(tmp_path).generate(ids, max_new_tokens=8, do_sample=False)
    got = generate(load_model(tmp_path, dtype=torch.float32), ids, max_new_tokens=8)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_hub_id_while_offline_is_one_line_without_the_hub_traceback(monkeypatch, tmp_path, load):
    _hub_cache(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as error:
        load("someone/tiny-llama")
    _assert_one_line(error)


def test_a_device_that_is_not_there_is_named(checkpoints):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    with pytest.raises(ValueError, match=rf"device='{missing}' but {torch.cuda.device_count()} CUDA device") as error:
        load_model(checkpoints("gqa"), device=missing)
    _assert_one_line(error)
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; valid: 'cpu', 'cuda', 'cuda:N', 'auto'"):
        load_model(checkpoints("gqa"), device="gpu")


def test_skip_modules_given_as_one_name_keeps_that_module_dense(checkpoints):
    model = load_model(checkpoints("gqa"), quantization="nf4", skip_modules="o_proj")
    assert all(type(layer.self_attn.o_proj) is torch.nn.Linear for layer in model.model.layers)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"


@pytest.mark.parametrize("weight_map", [["model.norm.weight"], {"model.norm.weight": 3}], ids=["list", "int-shard"])
def test_malformed_shard_index_is_named(checkpoints, tmp_path, weight_map):
    shutil.copytree(checkpoints("sharded"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="malformed shard index") as error:
        load_model(tmp_path / "m")
    _assert_one_line(error)


@pytest.mark.parametrize("text", ["{not json", "{}"])
def test_malformed_tokenizer_json_is_named(tmp_path, text):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match=r"tokenizer.json: not a tokenizers file \(") as error:
        load_tokenizer(tmp_path)
    _assert_one_line(error)
