"""Audit of generate and the KV cache against transformers: left-padded batches of mixed lengths with and without a
mask, EOS per row, the sampling edge cases, incremental decoding under padding with GQA and rope scaling, caches
that do not fit the call, and greedy decoding of NF4 and LoRA models."""

from __future__ import annotations

import pytest
import torch

from nf4lora.model import generate, load_model, sample_next
from nf4lora.model.llama import KVCache

from .conftest import VARIANTS, hf_model, rel_err
from .test_generate import _assert_same_distribution, _capture_sampled_probs, _hf_sampling_probs
from .test_llama import FP32_REL, _tiny

PROMPT_LENGTHS = (1, 7, 4, 7, 2)  # one token, two as long as the longest, and between


def _padded_batch(pad_id: int = 0) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """(rows, ids (5, 7) left-padded with pad_id, mask (5, 7)) over non-special ids."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 96, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    width = max(PROMPT_LENGTHS)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


@pytest.fixture(scope="module")
def pair(checkpoints):
    """variant -> (transformers model, ours), both fp32, built once per variant."""
    built = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = hf_model(**VARIANTS[variant]), load_model(checkpoints(variant), dtype=torch.float32)
        return built[variant]

    return get


@pytest.mark.parametrize("max_new_tokens", [1, 16])
@pytest.mark.parametrize("variant", ["gqa", "linear_rope", "mha_bias"])
def test_left_padded_batch_of_mixed_lengths_greedy_equals_transformers(pair, variant, max_new_tokens):
    hf, ours = pair(variant)
    rows, ids, mask = _padded_batch()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_ids=()), expected)
    assert torch.equal(generate(ours, rows, max_new_tokens=max_new_tokens, pad_id=0, eos_ids=()), expected)


def test_a_padded_tensor_without_a_mask_is_read_as_transformers_reads_it(pair):
    # transformers infers the mask from pad_token_id (ids != pad) unless the pad id is also an EOS id
    hf, ours = pair("gqa")
    _, ids, _ = _padded_batch(pad_id=4)
    ids[1, 3] = 4  # a pad id inside a prompt is padding too
    for pad, eos in ((4, None), (4, 2), (4, 4)):
        expected = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        got = generate(ours, ids, max_new_tokens=8, pad_id=pad, eos_ids=() if eos is None else eos)
        assert torch.equal(got, expected), (pad, eos)
    # only a pad id that was set marks padding: the config sets none, and the fallback (0 without EOS ids) is no signal
    assert ours.config.pad_token_id is None
    _, zeros_first, _ = _padded_batch(pad_id=0)
    unmasked = hf.generate(zeros_first, attention_mask=torch.ones_like(zeros_first), max_new_tokens=8,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, zeros_first, max_new_tokens=8, eos_ids=()), unmasked)


def test_a_prompt_ending_in_the_pad_id_without_a_mask_is_refused_naming_the_pad_id(pair):
    _, ours = pair("gqa")
    with pytest.raises(ValueError, match=r"prompt \(pad_id=7 marks padding\) row\(s\) \[1\] end in padding; "
                                         r".* pad on the left") as error:
        generate(ours, torch.tensor([[5, 6, 8], [8, 9, 7]]), pad_id=7, max_new_tokens=2)
    assert "\n" not in str(error.value)


def test_a_one_dimensional_prompt_takes_a_one_dimensional_mask(pair):
    _, ours = pair("gqa")
    prompt = torch.tensor([0, 0, 5, 6, 7])
    got = generate(ours, prompt, attention_mask=torch.tensor([0, 0, 1, 1, 1]), max_new_tokens=4, eos_ids=())
    assert torch.equal(got[:, 2:], generate(ours, [[5, 6, 7]], max_new_tokens=4, eos_ids=()))


def test_a_mask_given_with_token_lists_is_refused_not_ignored(pair):
    # the lists' lengths already decide the padding; a mask that said otherwise was silently dropped
    _, ours = pair("gqa")
    with pytest.raises(ValueError, match="attention_mask goes with a tensor of prompts; token lists get theirs from"):
        generate(ours, [[5, 6, 7], [8, 9, 10]], attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)


@pytest.mark.parametrize("case", ["first-token", "mid-row", "two-ids", "every-row-at-once", "pad-is-eos"])
def test_rows_stop_at_their_eos_as_in_transformers(pair, case):
    hf, ours = pair("gqa")
    _, ids, mask = _padded_batch()
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                       eos_token_id=None)[:, ids.shape[1]:]
    eos, pad = {
        "first-token": (int(free[0, 0]), 0),
        "mid-row": (int(free[1, 3]), 5),
        "two-ids": ([int(free[1, 3]), int(free[2, 1])], 0),
        "every-row-at-once": (free[:, 0].tolist(), 0),
        "pad-is-eos": (int(free[0, 0]), int(free[0, 0])),
    }[case]
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=12, pad_id=pad, eos_ids=eos), expected)


# the cases test_generate's parametrization leaves out: cuts that cut nothing, and a low temperature with top-p
@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, None, 1.0), (0.9, 96, None), (0.9, 500, 1.0), (0.05, None, 0.95)])
def test_sampling_edge_cases_draw_from_the_distribution_of_transformers_warpers(monkeypatch, temperature, top_k,
                                                                               top_p):
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(11)) * 3
    drawn = _capture_sampled_probs(monkeypatch)
    sample_next(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    _assert_same_distribution(drawn[0], _hf_sampling_probs(logits, temperature, top_k, top_p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiny_temperature_samples_the_argmax(dtype):
    # logits / 1e-38 overflow float32 to +-inf: softmax gave NaN and multinomial raised
    logits = (torch.randn(4, 96, generator=torch.Generator().manual_seed(11)) * 3).to(dtype)
    for top_k, top_p in ((None, None), (5, 0.9)):
        got = sample_next(logits, 1e-38, top_k, top_p, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, logits.argmax(dim=-1))


def test_the_seed_alone_decides_the_samples_and_leaves_the_global_rng_alone(pair):
    _, ours = pair("gqa")
    kwargs = dict(max_new_tokens=12, temperature=1.3, top_k=50, top_p=0.9, eos_ids=(), seed=7)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(generate(ours, [[5, 6, 7], [8]], **kwargs))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1])


def _incremental_logits(model, x, mask, prompt_len, static: bool) -> torch.Tensor:
    """Logits (B, T, vocab) of a prefill of `prompt_len` tokens under the left-padding `mask` (B, T) then one decode
    step per remaining token, at positions that skip the padding as generate's."""
    b, t = x.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(b, t + 3)
    slots = torch.arange(prompt_len) if static else None
    steps = [model(x[:, :prompt_len], attention_mask=mask[:, :prompt_len], position_ids=pos[:, :prompt_len],
                   cache=cache, cache_position=slots)]
    for i in range(prompt_len, t):
        slots = torch.tensor([i]) if static else None
        steps.append(model(x[:, i:i + 1], position_ids=pos[:, i:i + 1], cache=cache, cache_position=slots))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static_slots"])
@pytest.mark.parametrize("variant", ["gqa", "llama3", "linear_rope", "mha_bias"])
def test_incremental_decoding_under_left_padding_equals_full_forwards(pair, variant, static):
    hf, ours = pair(variant)
    x = torch.randint(3, 96, (3, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[2, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        incremental = _incremental_logits(ours, x, mask, 7, static)
        full = ours(x, attention_mask=mask, position_ids=pos)
        expected = hf(x, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions' logits are never read
    assert rel_err(incremental[real], full[real]) < FP32_REL
    assert rel_err(incremental[real], expected[real]) < FP32_REL


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_a_cache_of_another_dtype_than_the_model_is_refused_naming_both(mode):
    from nf4lora.kernels import use_kernels

    # the decode kernels take one dtype and SDPA refused the mix at the first decode step
    model = _tiny(hidden_size=64)
    x = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(0))
    devices = [layer.device for layer in model.model.layers]
    cache = KVCache(model.config, 2, 8, torch.bfloat16, devices)
    with torch.no_grad(), use_kernels(mode), pytest.raises(
            ValueError, match=r"KV cache holds 2 rows of torch.bfloat16; this call has 2 rows of the model's "
                              r"torch.float32") as error:
        model(x, cache=cache)
    assert "\n" not in str(error.value)
    cache = model.new_cache(2, 8)
    model.to(torch.float64)  # a model cast after its cache was built
    with torch.no_grad(), use_kernels(mode), pytest.raises(ValueError, match="rows of torch.float32; this call has "
                                                                             "2 rows of the model's torch.float64"):
        model(x, cache=cache)


def test_a_cache_for_another_batch_size_or_a_mask_wider_than_it_is_refused():
    model = _tiny()
    x = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"KV cache holds 2 rows of torch.float32; this call has 3 rows"):
            model(x, cache=model.new_cache(2, 8))
        with pytest.raises(ValueError, match=r"with a cache attention_mask must be \(B, L\) = \(3, at most 8\), got "
                                             r"\(3, 10\)"):
            model(x, attention_mask=torch.ones(3, 10), cache=model.new_cache(3, 8))
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, L\) = \(3, at most 8\), got \(2, 4\)"):
            model(x, attention_mask=torch.ones(2, 4), cache=model.new_cache(3, 8))


def _argmax_loop(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy continuation by a full forward over the whole sequence per token: no KV cache."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            nxt = model(ids, attention_mask=mask, position_ids=pos)[:, -1].argmax(dim=-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], dim=1), torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize(("quantization", "lora"), [("nf4", False), (None, True), ("nf4", True)],
                         ids=["nf4", "lora", "nf4+lora"])
def test_greedy_generate_of_nf4_and_lora_models_equals_the_full_forward_argmax_loop(checkpoints, quantization, lora):
    from nf4lora.lora import LoraConfig, inject_lora

    model = load_model(checkpoints("gqa"), quantization=quantization, dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        inject_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _, ids, mask = _padded_batch()
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_ids=()),
                       _argmax_loop(model, ids, mask, 10))

