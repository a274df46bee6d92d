"""Fuzz audit 4 of sampling against transformers 5: the tokens filter_logits keeps equal those transformers' TopK /
TopP warpers keep on random fp32 / fp16 / bf16 logits (ties at the k-th value, exact top-p boundaries, -inf
entries, rows of different scales); greedy batched decoding of random left-padded prompts equals transformers'
generate; the public sample_next / filter_logits refuse what generate refuses, in one line; temperatures beyond
float32's range sample their limit instead of raising; Fraction temperatures and top_p sample as their float."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch

from nf4lora.model import filter_logits, generate, load_model, sample_next

from .conftest import VARIANTS, hf_model
from .test_generate import _capture_sampled_probs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOP_PS = (None, 1e-9, 0.125, 0.25, 1 / 3, 0.5, 0.75, 0.875, 0.9, 1.0)


def _pick(g: torch.Generator, options: tuple):
    return options[int(torch.randint(len(options), (), generator=g))]


def _random_scores(g: torch.Generator, batch: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, vocab) scores in `dtype`, each row its own kind: gaussian at its own scale, dyadic values (ties, and
    probabilities whose cumulative sums land exactly on the top-p boundaries), or gaussian with -inf entries (the
    first token always finite)."""
    rows = []
    for _ in range(batch):
        kind = _pick(g, ("randn", "dyadic", "neginf"))
        if kind == "dyadic":
            row = torch.randint(0, 4, (vocab,), generator=g).float() * math.log(2)
        else:
            row = torch.randn(vocab, generator=g) * math.exp(float(torch.empty(()).uniform_(-2, 2, generator=g)))
        if kind == "neginf":
            row[1:] = row[1:].masked_fill(torch.rand(vocab - 1, generator=g) < 0.5, float("-inf"))
        rows.append(row)
    return torch.stack(rows).to(dtype)


def _hf_kept(scores: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """(B, vocab) bool: the tokens transformers' TopK then TopP warpers leave finite."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:  # generate adds no TopP warper at 1.0
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores != float("-inf")


def test_filter_logits_keeps_exactly_the_tokens_transformers_warpers_keep():
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    for case in range(300):
        vocab = _pick(g, (1, 2, 3, 8, 33, 100))
        scores = _random_scores(g, _pick(g, (1, 2, 4)), vocab, _pick(g, DTYPES))
        top_k, top_p = _pick(g, (None, 1, 2, 3, vocab - 1 or 1, vocab, vocab + 7)), _pick(g, TOP_PS)
        got = filter_logits(scores, top_k, top_p) != float("-inf")
        assert torch.equal(got, _hf_kept(scores, top_k, top_p)), (seed, case, scores.dtype, top_k, top_p)


def test_greedy_sampling_is_the_first_argmax_as_in_transformers():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for dtype in DTYPES:
        scores = _random_scores(g, 6, 40, dtype)
        assert torch.equal(sample_next(scores), torch.argmax(scores.float(), dim=-1))  # transformers' greedy step


@pytest.fixture(scope="module")
def pair(checkpoints):
    """(transformers model, ours) of the gqa variant, both fp32."""
    return hf_model(**VARIANTS["gqa"]), load_model(checkpoints("gqa"), dtype=torch.float32)


def test_greedy_tokens_of_random_left_padded_batches_equal_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(3):
        lengths = torch.randint(1, 9, (int(torch.randint(1, 5, (), generator=g)),), generator=g)
        width = int(lengths.max())
        mask = (torch.arange(width) >= width - lengths[:, None]).long()
        ids = torch.randint(3, 95, mask.shape, generator=g).masked_fill(mask == 0, 95)
        max_new_tokens = _pick(g, (1, 2, 11))
        free = generate(ours, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_ids=(), pad_id=95)
        eos = [int(free[0, -1])]  # a token row 0 does reach, so that at least one row stops
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=95, eos_token_id=eos)
        got = generate(ours, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=95)
        assert torch.equal(got, expected), (lengths.tolist(), max_new_tokens, eos)


BAD_ARGUMENTS = [("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
                 ("temperature", True), ("top_k", 0), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
                 ("top_p", 0.0), ("top_p", math.nan), ("top_p", 1.5), ("top_p", -0.5), ("top_p", True)]


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_sample_next_refuses_what_generate_refuses_naming_the_value(name, value):
    # -1 sampled the least likely tokens, top_p nan / 1.5 / -0.5 cut nothing and 0 cut all but the argmax, silently;
    # top_k 0 / -2 / 2.5 / True raised torch's size, index or type errors naming no argument
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match=rf"^need temperature a finite .*; got .*{name}={value!r}") as error:
        sample_next(logits, **{"temperature": 1.0, name: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in BAD_ARGUMENTS if n != "temperature"])
def test_filter_logits_refuses_cuts_outside_their_range_naming_the_value(name, value):
    with pytest.raises(ValueError, match=rf"^need top_k >= 1 \(an int\) or None, top_p in \(0, 1\] or None; got "
                                         rf".*{name}={value!r}") as error:
        filter_logits(torch.randn(2, 10), **{name: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("scores", [torch.randn(10), torch.randn(1, 2, 10), torch.randint(0, 9, (2, 10)),
                                    torch.randn(2, 0)], ids=["1d", "3d", "int", "no-vocab"])
def test_logits_that_are_not_a_batch_by_vocab_float_tensor_are_refused(scores):
    # IndexError "Dimension out of range", a size mismatch, an int64 overflow or an empty amax, naming nothing
    for call, name in ((lambda: sample_next(scores, 0.7), "logits"), (lambda: filter_logits(scores, 2), "scores")):
        with pytest.raises(ValueError, match=rf"^{name} must be a \(batch, vocab\) float tensor with vocab >= 1, got "
                                             rf"shape {re.escape(str(tuple(scores.shape)))}"):
            call()


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-46])
def test_a_temperature_that_float32_rounds_to_zero_samples_the_argmax(temperature):
    # (logits - max) / 0.0 gave NaN for the best token and multinomial raised
    logits = torch.randn(4, 50) * 3
    got = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [1e39, 1e300, 10**400])
def test_a_temperature_beyond_float32_samples_uniformly_among_the_finite_tokens(monkeypatch, temperature):
    # -inf / inf gave NaN and multinomial raised; 10**400 raised OverflowError "int too big to convert"
    logits = torch.randn(3, 20) * 3
    logits[:, 5:9] = float("-inf")
    drawn = _capture_sampled_probs(monkeypatch)
    sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    expected = torch.full_like(logits, 1 / 16).masked_fill(logits == float("-inf"), 0)
    torch.testing.assert_close(drawn[0], expected, rtol=0, atol=1e-6)


def test_generate_takes_temperatures_beyond_float32_and_fractions(pair):
    _, ours = pair
    kwargs = dict(max_new_tokens=5, eos_ids=(), seed=int(torch.randint(0, 2**31, ())))
    greedy = generate(ours, [[5, 6, 7], [8]], **kwargs)
    assert torch.equal(generate(ours, [[5, 6, 7], [8]], temperature=1e-320, **kwargs), greedy)
    assert generate(ours, [[5, 6, 7], [8]], temperature=10**400, **kwargs).shape == (2, 8)
    # check_sampling_arguments takes any real number; a Fraction raised TypeError in the division / comparison
    assert torch.equal(generate(ours, [[5, 6, 7]], temperature=Fraction(3, 4), top_p=Fraction(9, 10), **kwargs),
                       generate(ours, [[5, 6, 7]], temperature=0.75, top_p=0.9, **kwargs))
