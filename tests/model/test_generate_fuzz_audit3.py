"""Fuzz audit 3 of generate against transformers 5: the sampling distribution over random logits with ties, -inf
entries and extreme temperatures / cuts; seeded sampling token for token against transformers' sampling; and the
arguments generate used to accept silently (float, bool or text token ids, float EOS / pad ids, bool temperature or
top_p, a mask that is not a 0/1 tensor) or refuse in a line naming nothing (numpy seeds, huge ids, text EOS ids)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nf4lora.model import generate, load_model, sample_next

from .conftest import VARIANTS, hf_model
from .test_generate import _capture_sampled_probs, _hf_sampling_probs

TEMPERATURES = (1e-30, 1e-3, 0.5, 1.0, 2.0, 1e3, 1e30)
TOP_PS = (None, 1e-9, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0)


def _random_logits(g: torch.Generator, kind: str, batch: int, vocab: int) -> torch.Tensor:
    """(batch, vocab) float32 logits: gaussian at a random scale, few distinct values (ties, and probabilities that
    land exactly on top-p boundaries), or gaussian with -inf entries (the first token always finite)."""
    if kind == "ties":
        return torch.randint(0, 3, (batch, vocab), generator=g).float() * math.log(2)
    logits = torch.randn(batch, vocab, generator=g) * float(torch.empty(1).uniform_(-2, 2.5, generator=g).exp())
    if kind == "neginf":
        dropped = torch.rand(batch, vocab, generator=g) < 0.5
        dropped[:, 0] = False
        logits = logits.masked_fill(dropped, float("-inf"))
    return logits


def _pick(g: torch.Generator, options: tuple):
    return options[int(torch.randint(len(options), (), generator=g))]


def test_the_sampling_distribution_equals_transformers_warpers_on_random_logits(monkeypatch):
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    drawn = _capture_sampled_probs(monkeypatch)
    compared = 0
    for case in range(150):
        vocab = _pick(g, (1, 2, 3, 17, 96))
        logits = _random_logits(g, _pick(g, ("randn", "ties", "neginf")), _pick(g, (1, 3)), vocab)
        temperature, top_k, top_p = _pick(g, TEMPERATURES), _pick(g, (None, 1, 2, vocab, vocab + 5)), _pick(g, TOP_PS)
        sample_next(logits, temperature, top_k, top_p, generator=g)
        expected = _hf_sampling_probs(logits, temperature, top_k, top_p if top_p != 1.0 else None)
        if torch.isnan(expected).any():  # transformers overflows at 1e-30; ours samples the argmax (audit2)
            continue
        compared += 1
        assert torch.equal(drawn[-1] == 0, expected == 0), (seed, case, temperature, top_k, top_p)
        torch.testing.assert_close(drawn[-1], expected, rtol=0, atol=1e-5,
                                   msg=lambda m: f"seed {seed} case {case}: {m}")
    assert compared > 100


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, None, None), (1.5, 5, 0.9), (1.0, 50, 0.3)])
def test_seeded_sampling_equals_transformers_sampling_token_for_token(checkpoints, temperature, top_k, top_p):
    # both draw with torch.multinomial from the same probabilities: our seeded generator and transformers' global
    # one seeded alike give the same stream
    hf = hf_model(**VARIANTS["gqa"])
    ours = load_model(checkpoints("gqa"), dtype=torch.float32)
    ids = torch.randint(3, 96, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    seed = int(torch.randint(0, 2**31, ()))
    hf.generation_config.eos_token_id = 2
    torch.manual_seed(seed)
    expected = hf.generate(ids.masked_fill(mask == 0, 0), attention_mask=mask, do_sample=True, max_new_tokens=10,
                           temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0, pad_token_id=0)
    got = generate(ours, ids.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=10,
                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_ids=2, pad_id=0)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints("gqa"), dtype=torch.float32)


def _refused(model, match: str, prompts=((5, 6, 7),), **kwargs) -> None:
    """generate refuses the call with one ValueError line matching `match`."""
    with pytest.raises(ValueError, match=match) as error:
        generate(model, [list(p) for p in prompts] if isinstance(prompts, tuple) else prompts, max_new_tokens=2,
                 **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("prompts", [[[5, 6.7]], [[5.0, 6.0]], [[True, 6]], "123", ["5", "6"], [[5, "6"]]],
                         ids=["float", "integral-float", "bool", "digit-text", "digit-strings", "string-id"])
def test_token_lists_holding_anything_but_ints_are_refused(model, prompts):
    # int() truncated 6.7 to 6, read True as 1, and read "123" as three one-token prompts
    _refused(model, r"prompts must be token ids \(encode text first\).*got ", prompts)


def test_token_lists_of_numpy_ints_and_integer_tensors_are_taken(model):
    rows = [[5, 6, 7], [8, 9]]
    expected = generate(model, rows, max_new_tokens=3, eos_ids=())
    for given in ([np.array(r) for r in rows], [torch.tensor(r) for r in rows]):
        assert torch.equal(generate(model, given, max_new_tokens=3, eos_ids=()), expected)


def test_a_token_id_beyond_int64_in_a_list_is_named_with_the_vocab_range(model):
    # torch.tensor raised "Overflow when unpacking long long"
    _refused(model, rf"token id {2**70} is out of range; valid: 0 to 95 \(vocab_size\)", [[5, 2**70]])


@pytest.mark.parametrize("argument", ["temperature", "top_p"])
def test_a_bool_temperature_or_top_p_is_refused(model, argument):
    # True passed as 1.0; top_k=True was already refused
    _refused(model, rf"{argument} .*; got .*{argument}=True", **{argument: True})


@pytest.mark.parametrize(("eos_ids", "shown"), [(2.5, "2.5"), ("2", "'2'"), (["a"], r"\['a'\]"),
                                                ([2, 7.0], r"\[2, 7.0\]"), (torch.tensor([2.0]), r"tensor\(\[2.\]\)"),
                                                (2**64, str(2**64))])
def test_eos_ids_that_are_not_int64_ids_are_refused_naming_them(model, eos_ids, shown):
    # a float was truncated (2.5 ended rows at 2); a string raised torch's "new(): invalid data type 'str'"
    _refused(model, rf"eos_ids={shown} .*valid: an int, ints .* or None", eos_ids=eos_ids)


def test_eos_ids_as_a_set_a_tensor_or_numpy_ints_end_rows(model):
    free = generate(model, [[5, 6, 7]], max_new_tokens=4, eos_ids=())
    stop = int(free[0, 4])
    for eos_ids in ({stop, 90}, torch.tensor([stop]), np.int64(stop), [np.int64(stop)]):
        out = generate(model, [[5, 6, 7]], max_new_tokens=4, eos_ids=eos_ids, pad_id=0)
        assert out[0, 4] == stop and (out[0, 5:] == 0).all()


@pytest.mark.parametrize(("pad_id", "shown"), [(1.5, "1.5"), ("x", "'x'"), (True, "True"), (2**63, str(2**63))])
def test_a_pad_id_that_is_not_an_int64_is_refused_naming_it(model, pad_id, shown):
    # 1.5 padded with 1, "x" raised "'str' object cannot be interpreted as an integer", 2**63 an overflow
    _refused(model, rf"pad_id={shown} .*valid: an int in \[-2\*\*63, 2\*\*63\) or None", [[5, 6], [7]],
             pad_id=pad_id)


def test_a_numpy_seed_samples_as_the_same_python_int(model):
    # the check took np.int64 and torch.Generator.manual_seed then raised "an integer is required"
    kwargs = dict(max_new_tokens=6, temperature=1.3, eos_ids=())
    assert torch.equal(generate(model, [[5, 6, 7]], seed=np.int64(3), **kwargs),
                       generate(model, [[5, 6, 7]], seed=3, **kwargs))


def test_an_attention_mask_that_is_no_tensor_is_refused(model):
    # it raised AttributeError: 'list' object has no attribute 'to'
    _refused(model, r"attention_mask must be a tensor of 0/1 .*got list", torch.tensor([[5, 6]]),
             attention_mask=[[1, 1]])


@pytest.mark.parametrize("mask", [[[2, 1]], [[0.5, 1.0]], [[-1, 1]]])
def test_an_attention_mask_holding_other_values_than_0_and_1_is_refused(model, mask):
    # read as "nonzero attends": 0.5 and -1 attended silently
    _refused(model, r"attention_mask must hold only 0 and 1 .*got ", torch.tensor([[5, 6]]),
             attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("name, value", [("cuda_graph", "no"), ("static_cache", 1), ("compile", "False")])
def test_a_decoding_flag_that_is_not_a_bool_is_refused(model, name, value):
    # a truthy string or int turned graphs, the static cache or torch.compile on
    _refused(model, f"{name}={value!r} is not a flag; valid: True", **{name: value})
