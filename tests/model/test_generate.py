"""generate(): greedy tokens equal transformers' generate, batching, stopping, seeded sampling and the distribution it
draws from, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from nf4lora.model import Llama, LlamaConfig, filter_logits, generate, generate_stream, load_model, sample_next

from .conftest import VARIANTS, hf_model


def _left_padded(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("variant", ["gqa", "llama3"])
def test_greedy_tokens_equal_transformers_generate(checkpoints, variant):
    hf = hf_model(**VARIANTS[variant])
    ours = load_model(checkpoints(variant), dtype=torch.float32)
    ids, mask = _left_padded()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                           eos_token_id=2)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=24, pad_id=0, eos_ids=2)
    assert torch.equal(got, expected)


def test_static_cache_decoding_equals_prefix_decoding(checkpoints):
    model = load_model(checkpoints("llama3"), dtype=torch.float32)
    ids, mask = _left_padded()
    prefix = generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_ids=())
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_ids=(), static_cache=True),
                       prefix)


def test_fixed_shape_decoding_shares_one_cache_shape_across_lengths(checkpoints, monkeypatch):
    # one shape for nearby lengths: one compiled graph, not a recompile per prompt or max_new_tokens
    model = load_model(checkpoints("llama3"), dtype=torch.float32)
    lengths = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, n: lengths.append(n) or new_cache(b, n))
    for prompt, n in (([5, 6], 3), ([5, 6, 7, 8], 40)):
        generate(model, [prompt], max_new_tokens=n, eos_ids=(), static_cache=True)
    generate(model, [[5, 6]], max_new_tokens=3, eos_ids=())  # the prefix cache keeps the exact length
    assert lengths == [256, 256, 5]


def test_batched_rows_decode_as_they_would_alone(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [40]]
    batch = generate(model, rows, max_new_tokens=12, eos_ids=())
    assert batch.shape == (3, 6 + 12)
    for row, out in zip(rows, batch):
        alone = generate(model, [row], max_new_tokens=12, eos_ids=())
        assert out[-12:].tolist() == alone[0, -12:].tolist()


def test_rows_stop_at_eos_and_are_padded(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    rows = [[5, 6, 7], [8, 9, 10]]
    free = generate(model, rows, max_new_tokens=10, eos_ids=())
    stop = int(free[0, 3])  # make row 0's first new token the EOS
    out = generate(model, rows, max_new_tokens=10, eos_ids=stop, pad_id=-1)
    assert out[0, 3] == stop and (out[0, 4:] == -1).all()
    n = int((out[1] != -1).sum())
    assert torch.equal(out[1, :n], free[1, :n])  # the other row is unaffected until its own stop
    everyone = generate(model, rows, max_new_tokens=10, eos_ids=[int(free[0, 3]), int(free[1, 3])])
    assert everyone.shape == (2, 4)  # all rows done after one token: decoding stops early


def test_stream_yields_generate_s_tokens_step_by_step(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    rows = [[5, 6, 7], [8, 9]]  # left-padded with pad_id
    sampling = dict(max_new_tokens=8, pad_id=0, temperature=0.8, top_k=20, seed=4)
    stop = int(generate(model, rows, eos_ids=(), **sampling)[0, 4])  # row 0's second new token ends it
    steps = list(generate_stream(model, rows, eos_ids=stop, **sampling))
    assert all(step.shape == (2,) for step in steps)
    expected = generate(model, rows, eos_ids=stop, **sampling)[:, 3:]
    assert (expected[0, 2:] == 0).all() and torch.equal(torch.stack(steps, dim=1), expected)
    with pytest.raises(ValueError, match="need max_new_tokens >= 1"):
        generate_stream(model, rows, max_new_tokens=0)  # refused at the call, not at the first step


def test_seeded_sampling_is_reproducible_and_seed_dependent(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=40, top_p=0.95, eos_ids=())
    a = generate(model, [[5, 6, 7]] * 4, seed=1, **kwargs)
    assert torch.equal(a, generate(model, [[5, 6, 7]] * 4, seed=1, **kwargs))
    assert not torch.equal(a, generate(model, [[5, 6, 7]] * 4, seed=2, **kwargs))
    greedy = generate(model, [[5, 6, 7]], max_new_tokens=16, eos_ids=())
    top1 = generate(model, [[5, 6, 7]], seed=3, temperature=0.7, top_k=1, max_new_tokens=16, eos_ids=())
    assert torch.equal(top1, greedy)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, None), (None, 0.8), (10, 0.5), (None, 0.001)])
def test_filters_keep_the_same_tokens_as_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, 96, generator=torch.Generator().manual_seed(7)) * 3
    expected = scores.clone()
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(scores, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])


def _hf_sampling_probs(logits, temperature, top_k, top_p):
    """The distribution transformers samples from: its warpers in generate's order (temperature, top-k, top-p),
    then softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def _capture_sampled_probs(monkeypatch) -> list[torch.Tensor]:
    """The probabilities each later `torch.multinomial` call receives (the draws themselves still happen)."""
    probs = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: probs.append(p.clone()) or real(p, *a, **k))
    return probs


def _assert_same_distribution(got, expected):
    assert torch.equal(got == 0, expected == 0)  # the same tokens filtered out
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # fp32: same ops, observed bitwise equal


# each of temperature, top-k and top-p alone, then together: a low temperature also narrows the top-p nucleus
@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(0.6, None, None), (1.0, 8, None), (1.0, None, 0.7), (1.7, 12, 0.9), (0.5, None, 0.9)])
def test_sampling_draws_from_the_distribution_of_transformers_warpers(monkeypatch, temperature, top_k, top_p):
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(11)) * 3
    drawn = _capture_sampled_probs(monkeypatch)
    sample_next(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 1
    _assert_same_distribution(drawn[0], _hf_sampling_probs(logits, temperature, top_k, top_p))


def test_generate_passes_its_sampling_arguments_to_the_draw(checkpoints, monkeypatch):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(ids)[:, -1]
    drawn = _capture_sampled_probs(monkeypatch)
    generate(model, ids, max_new_tokens=1, temperature=0.7, top_k=20, top_p=0.9, seed=0, eos_ids=())
    assert len(drawn) == 1
    _assert_same_distribution(drawn[0], _hf_sampling_probs(logits, 0.7, 20, 0.9))


def test_bad_generation_arguments_are_named(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    with pytest.raises(ValueError, match="need max_new_tokens >= 1"):
        generate(model, [[1, 2]], max_new_tokens=0)
    for seed in (True, 1.5, 2**64):  # torch raised an overflow or a type error naming no argument
        with pytest.raises(ValueError, match=rf"seed an int in \[-2\*\*63, 2\*\*64\) or None; got .*seed={seed!r}"):
            generate(model, [[1, 2]], temperature=0.7, seed=seed)
    with pytest.raises(ValueError, match=r"prompt row\(s\) \[0\] are empty"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="prompts hold no rows"):
        generate(model, [])
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on CUDA"):
        generate(model, [[1, 2]], cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", [None, "nf4"])
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compile+graph"])
def test_cuda_graph_decoding_equals_eager(checkpoints, quantization, compile):
    model = load_model(checkpoints("gqa"), quantization=quantization, dtype=torch.float32, device="cuda")
    ids, mask = _left_padded()
    eager = generate(model, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, eos_ids=(), static_cache=True,
                     cuda_graph=False)
    graphed = generate(model, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, eos_ids=(),
                       cuda_graph=True, compile=compile)
    assert torch.equal(eager, graphed)  # fp32 on a tiny model: greedy choices are far from ties


@pytest.mark.slow
def test_compiled_decoding_equals_eager(checkpoints):
    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    ids, mask = _left_padded()
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_ids=())
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_ids=(), compile=True), eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_decoding_on_one_gpu_replays_a_graph_also_with_lora(checkpoints, monkeypatch):
    import importlib

    from nf4lora.lora import LoraConfig, inject_lora

    generate_module = importlib.import_module("nf4lora.model.generate")  # the package exports the function

    model = load_model(checkpoints("gqa"), quantization="nf4", dtype=torch.float32, device="cuda")
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    captured = []
    real_step = generate_module._GraphedDecodeStep
    monkeypatch.setattr(generate_module, "_GraphedDecodeStep", lambda *a: captured.append(1) or real_step(*a))
    ids, mask = _left_padded()
    default = generate(model, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, eos_ids=())
    assert captured == [1]
    eager = generate(model, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, eos_ids=(), static_cache=True,
                     cuda_graph=False)
    assert torch.equal(default, eager)
    generate(model, ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=4, eos_ids=())  # too short to pay back
    assert captured == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_built_under_a_cuda_device_context_decodes_in_a_graph():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama(config)
    assert model.inv_freq.device.type == "cuda"  # not left on the CPU, where a graph capture cannot copy it from
    ids = torch.randint(0, 96, (1, 5), device="cuda")
    graphed = generate(model, ids, max_new_tokens=10, eos_ids=(), cuda_graph=True)
    assert torch.equal(graphed, generate(model, ids, max_new_tokens=10, eos_ids=(), static_cache=True, cuda_graph=False))
