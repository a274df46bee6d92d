"""Fuzz audit of config variants: random transformers Llama (and Mistral) configs saved by `save_pretrained`, read
in either config dialect and loaded by `load_model` in fp32, against transformers' own model; and the config keys
found read differently from transformers (silently wrong logits) or refused although transformers accepts them."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nf4lora.model import LlamaConfig, load_model

from .conftest import rel_err
from .test_llama import FP32_REL
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _random_rope(rng: random.Random) -> dict:
    """transformers 5 rope_parameters: default, linear or llama3 with random factors and original context."""
    theta = rng.choice([100.0, 10000.0, 500000.0])
    kind = rng.choice(["default", "linear", "llama3"])
    if kind == "default":
        return dict(rope_type="default", rope_theta=theta)
    if kind == "linear":
        return dict(rope_type="linear", rope_theta=theta, factor=rng.choice([0.5, 2, 4.5]))
    low = rng.choice([0.5, 1.0, 2.0])
    return dict(rope_type="llama3", rope_theta=theta, factor=rng.choice([1.0, 8.0, 32.0]), low_freq_factor=low,
                high_freq_factor=low * rng.choice([1.5, 4.0]), original_max_position_embeddings=rng.choice([4, 16]))


def _random_config(rng: random.Random) -> dict:
    """A random tiny LlamaConfig's kwargs: head_dim given or derived, any GQA group, biases, tying, eps, RoPE."""
    heads = rng.choice([1, 2, 4])
    head_dim = rng.choice([4, 8, 12])
    config = dict(vocab_size=rng.choice([64, 100]), intermediate_size=rng.choice([16, 40]),
                  num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads,
                  num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]),
                  max_position_embeddings=rng.choice([4, 8, 64]), rms_norm_eps=rng.choice([1e-6, 1e-3, 0.1]),
                  attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5,
                  tie_word_embeddings=rng.random() < 0.5, pretraining_tp=rng.choice([1, 2]),
                  rope_parameters=_random_rope(rng))
    if rng.random() < 0.5:  # an explicit head_dim that hidden_size / heads does not give
        return {**config, "hidden_size": rng.choice([16, 48]), "head_dim": head_dim}
    return {**config, "hidden_size": heads * head_dim}


def _save(path, config: dict, cls=transformers.LlamaForCausalLM, config_cls=transformers.LlamaConfig):
    """Save a seeded random fp32 model of `config` (random norms and biases) at `path`; return it in eval mode."""
    torch.manual_seed(0)
    model = cls(config_cls(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def _edit_config(path, edit) -> None:
    """Apply `edit(dict)` to path/config.json in place."""
    file = path / "config.json"
    raw = json.loads(file.read_text())
    edit(raw)
    file.write_text(json.dumps(raw))


def _as_transformers_4(raw: dict) -> None:
    """Rewrite a transformers 5 config.json dict in transformers 4's dialect: rope_theta, rope_scaling with "type"."""
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    raw["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}


def _assert_logits_match(reference, ours, vocab_size: int, t: int) -> None:
    """Logits of 2 random rows of t tokens: plain, left-padded, and a KV-cache decode step after a padded prefill."""
    ids = torch.randint(0, vocab_size, (2, t))
    mask = torch.ones(2, t, dtype=torch.long)
    mask[0, :min(2, t - 1)] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        assert rel_err(ours(ids), reference(ids).logits) < FP32_REL
        full = reference(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
        assert rel_err(got[mask.bool()], full[mask.bool()]) < FP32_REL
        cache = ours.new_cache(2, t)
        ours(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache)
        step = ours(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], cache=cache)
        assert rel_err(step[:, -1], full[:, -1]) < FP32_REL


@pytest.mark.parametrize("seed", range(8))
def test_random_configs_in_either_dialect_match_transformers(tmp_path, seed):
    rng = random.Random(seed * 7919 + int(torch.randint(0, 10**6, ())))
    config = _random_config(rng)
    print(config)  # shown when the test fails
    reference = _save(tmp_path, config)
    if rng.random() < 0.5:
        _edit_config(tmp_path, _as_transformers_4)
    # up to 3x max_position_embeddings: positions past the trained context run as in transformers
    t = rng.randint(2, 3 * config["max_position_embeddings"])
    _assert_logits_match(reference, load_model(tmp_path, dtype=torch.float32), config["vocab_size"], t)


@pytest.mark.parametrize("where", ["absent", "top_level"])
def test_llama3_original_context_is_read_as_transformers_5_reads_it(tmp_path, where):
    # refused before when absent (transformers 5 takes max_position_embeddings); a top-level key, which transformers
    # 5 puts over the dict's, was ignored: the logits were off by ~2e-3
    _save(tmp_path, {**TINY, "rope_parameters": {**LLAMA3, "original_max_position_embeddings": 64}})
    if where == "absent":
        _edit_config(tmp_path, lambda raw: raw["rope_parameters"].pop("original_max_position_embeddings"))
        expected = TINY["max_position_embeddings"]
    else:
        _edit_config(tmp_path, lambda raw: raw.update(original_max_position_embeddings=8))
        expected = 8
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.config.rope_scaling["original_max_position_embeddings"] == expected
    _assert_logits_match(reference, ours, TINY["vocab_size"], t=int(torch.randint(12, 40, ())))


@pytest.mark.parametrize("raw", [
    {"partial_rotary_factor": 0.5},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "partial_rotary_factor": 0.5},
    {"rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": "0.5"}},
])
def test_a_partial_rotary_factor_is_refused_in_one_line(raw):
    # accepted before, the whole head rotated; transformers' Llama ignores it too (plain RoPE) or fails on the forward
    message = r"^cfg.json: partial_rotary_factor='?0\.\d+'? is not supported .*; valid: 1$"
    with pytest.raises(ValueError, match=message) as error:
        LlamaConfig.from_hf_dict({**TINY, **raw}, source="cfg.json")
    _assert_one_line(error)


def test_a_whole_rotary_factor_is_plain_rope():
    rope = {**LLAMA3, "original_max_position_embeddings": 8}
    config = LlamaConfig.from_hf_dict({**TINY, "partial_rotary_factor": 1.0, "rope_parameters": rope})
    assert config == LlamaConfig.from_hf_dict({**TINY, "rope_parameters": rope})


def test_a_mistral_config_without_keys_takes_mistrals_defaults(tmp_path):
    # a Mistral config.json without num_key_value_heads means 8 kv heads (transformers' MistralConfig), not one per head
    config = {**TINY, "num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 64, "sliding_window": None}
    reference = _save(tmp_path, config, transformers.MistralForCausalLM, transformers.MistralConfig)
    _edit_config(tmp_path, lambda raw: raw.pop("num_key_value_heads"))
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.config.num_key_value_heads == 8
    _assert_logits_match(reference, ours, TINY["vocab_size"], t=9)


def test_a_mistral_config_without_sliding_window_has_mistrals_4096_token_window():
    # accepted before with full attention; transformers' Mistral masks keys more than 4096 tokens back
    raw = {**TINY, "model_type": "mistral", "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match=r"^cfg.json: sliding_window=4096 attention is not supported; valid: null "
                                         r"\(or an int >= max_position_embeddings=32768\)$") as error:
        LlamaConfig.from_hf_dict(raw, source="cfg.json")
    _assert_one_line(error)
    short = LlamaConfig.from_hf_dict({**raw, "max_position_embeddings": 4096})
    assert short.sliding_window == 4096 and LlamaConfig.from_hf_dict({**raw, "sliding_window": None}).sliding_window \
        is None
    without_kv_heads = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    mistral = LlamaConfig.from_hf_dict({**without_kv_heads, "num_attention_heads": 16, "head_dim": 4,
                                        "architectures": ["MistralForCausalLM"]})
    assert mistral.num_key_value_heads == 8


def test_inputs_longer_than_the_sliding_window_are_refused_not_attended_in_full(tmp_path):
    # a window as long as the context loads; longer inputs ran with full attention, where transformers' Mistral masks
    # the keys out of the window (logits off by ~0.1)
    window = int(torch.randint(6, 10, ()))
    config = {**TINY, "max_position_embeddings": window, "sliding_window": window}
    reference = _save(tmp_path, config, transformers.MistralForCausalLM, transformers.MistralConfig)
    ours = load_model(tmp_path, dtype=torch.float32)
    _assert_logits_match(reference, ours, TINY["vocab_size"], t=window)
    ids = torch.randint(0, TINY["vocab_size"], (1, window + 1))
    message = rf"^{window + 1} attended tokens exceed sliding_window={window} .*; valid: at most {window} tokens"
    for call in (lambda: ours(ids), lambda: ours(ids[:, -1:], cache=_filled_cache(ours, ids[:, :-1]))):
        with pytest.raises(ValueError, match=message) as error:
            call()
        _assert_one_line(error)


def _filled_cache(model, ids):
    """A KV cache of room for one more token than `ids` (1, T), filled by a prefill of ids."""
    cache = model.new_cache(1, ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


def test_swish_is_silu(tmp_path):
    # transformers' ACT2FN maps "swish" to SiLU; refused before
    reference = _save(tmp_path, {**TINY, "hidden_act": "swish"})
    _assert_logits_match(reference, load_model(tmp_path, dtype=torch.float32), TINY["vocab_size"], t=7)


def test_generate_refuses_a_run_past_the_sliding_window_before_any_token_and_fits_its_static_cache(tmp_path):
    # generate ran until the forward refused midway (tokens already streamed), and a static cache rounded up to 256
    # slots read past a window the tokens fitted in
    from nf4lora.model import generate, generate_stream

    window = int(torch.randint(8, 12, ()))
    config = {**TINY, "max_position_embeddings": window, "sliding_window": window}
    reference = _save(tmp_path, config, transformers.MistralForCausalLM, transformers.MistralConfig)
    ours = load_model(tmp_path, dtype=torch.float32)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 3)).tolist()
    with pytest.raises(ValueError, match=rf"^3 prompt tokens \+ max_new_tokens={window - 2} exceed the config's "
                                         rf"sliding_window={window}, .*; valid: at most {window} tokens in all$"):
        generate_stream(ours, prompt, max_new_tokens=window - 2, eos_ids=())
    out = generate(ours, prompt, max_new_tokens=window - 3, eos_ids=(), static_cache=True)
    expected = reference.generate(torch.tensor(prompt), max_new_tokens=window - 3, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    assert out.tolist() == expected.tolist()
