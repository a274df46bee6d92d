"""The Llama forward pass against transformers' LlamaForCausalLM, masks, packing, KV cache, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from nf4lora.model import Llama, LlamaConfig, load_model

from .conftest import VARIANTS, hf_model, rel_err

# Tests that force the Triton path run the kernels on the GPU where there is one (the interpreter is set up only
# on machines without CUDA), else on CPU tensors under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# fp32: both sides run the same float32 math in a different op order; observed ~1e-7, the issue asks 1e-5.
FP32_REL = 1e-5
# bf16: 8 mantissa bits, rounding after every op of a 2-3 layer model; the issue asks 2e-2.
BF16_REL = 2e-2


def _ids(batch=2, length=12, vocab=96, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_logits_match_transformers(checkpoints, variant):
    path = checkpoints(variant)
    hf = hf_model(**VARIANTS[variant])
    ours = load_model(path, dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert got.shape == (2, 12, 96) and got.dtype == torch.float32
    assert rel_err(got, expected) < FP32_REL


@pytest.mark.parametrize("variant", ["gqa", "llama3"])
def test_bf16_logits_match_transformers(checkpoints, variant):
    hf = hf_model(**VARIANTS[variant]).to(torch.bfloat16)
    ours = load_model(checkpoints(variant), dtype=torch.bfloat16)
    x = _ids()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) < BF16_REL


def _llama3_band_sizes(head_dim: int, rope: dict) -> tuple[int, int, int]:
    """How many unscaled RoPE frequencies fall in llama3's (kept, blended, divided by factor) bands, by
    transformers' wavelength rule."""
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = rope["original_max_position_embeddings"]
    high_freq_wavelen, low_freq_wavelen = old_len / rope["high_freq_factor"], old_len / rope["low_freq_factor"]
    blended = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return int((wavelen < high_freq_wavelen).sum()), int(blended.sum()), int((wavelen > low_freq_wavelen).sum())


def test_llama3_rope_matches_transformers_in_all_three_bands(checkpoints):
    hf = hf_model(**VARIANTS["llama3"])
    rope = VARIANTS["llama3"]["rope_parameters"]
    # else a band, the blend above all, goes untested in every llama3 test
    assert min(_llama3_band_sizes(hf.config.head_dim, rope)) > 0
    ours = load_model(checkpoints("llama3"), dtype=torch.float32)
    # Identical float32 formula; only the op order of the blend may differ by an ulp.
    torch.testing.assert_close(ours.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    x = _ids(2, rope["original_max_position_embeddings"] + 8)  # positions past the original context too
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert rel_err(got, expected) < FP32_REL


def test_padding_mask_matches_transformers(checkpoints):
    hf = hf_model()
    ours = load_model(checkpoints("gqa"), dtype=torch.float32)
    x = _ids(3, 9)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        expected = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    keep = mask.bool()
    assert torch.isfinite(got).all()
    assert rel_err(got[keep], expected[keep]) < FP32_REL


def _tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2), **overrides})
    return Llama(cfg).eval()


def test_segment_ids_keep_packed_examples_independent():
    model = _tiny()
    a, b = _ids(1, 5, 50, seed=2), _ids(1, 7, 50, seed=3)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        got = model(packed, segment_ids=segments)
        alone = torch.cat([model(a), model(b)], dim=1)
    # Same math on the same rows; only the SDPA masking path differs, so float32 rounding order alone.
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_4d_boolean_mask_equals_segment_ids():
    model = _tiny()
    x = _ids(2, 8, 50)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 2, 2]])
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask4d = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    with torch.no_grad():
        a = model(x, segment_ids=seg)
        b = model(x, attention_mask=mask4d, position_ids=pos)
        c = model(x, attention_mask=torch.where(mask4d, 0.0, float("-inf")), position_ids=pos)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)  # additive vs boolean mask: same softmax, fp32 rounding


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static_slots"])
def test_kv_cache_decoding_matches_full_forward(static):
    model = _tiny()
    x = _ids(2, 10, 50)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        steps = [model(x[:, :6], cache=cache)]
        for i in range(6, 10):
            slot = torch.tensor([i]) if static else None
            pos = torch.full((2, 1), i) if static else None
            steps.append(model(x[:, i:i + 1], cache=cache, cache_position=slot, position_ids=pos))
    # Same math; attention over cached keys reorders the fp32 reductions.
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_static_cache_decode_steps_take_the_decode_attention_kernel(monkeypatch):
    from nf4lora.kernels import decode_attention, use_kernels

    # head_dim 16, 2 query heads per kv head
    model = _tiny(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(KERNEL_DEVICE)
    calls = []
    real = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *a: calls.append(1) or real(*a))
    x = _ids(2, 10, 50).to(KERNEL_DEVICE)
    outputs = {}
    for mode in ("triton", "reference"):
        with torch.no_grad(), use_kernels(mode):
            cache = model.new_cache(2, 16)
            cache.set_padding(torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))  # left padding: masked keys
            steps = [model(x[:, :6], cache=cache, cache_position=torch.arange(6, device=KERNEL_DEVICE))]
            for i in range(6, 10):
                steps.append(model(x[:, i:i + 1], cache=cache, cache_position=torch.tensor([i], device=KERNEL_DEVICE),
                                   position_ids=torch.full((2, 1), i, device=KERNEL_DEVICE)))
        outputs[mode] = torch.cat(steps, dim=1)
    assert len(calls) == 4 * model.config.num_hidden_layers  # every decode step's attention, not the prefill's
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-5, atol=1e-5)


def test_inference_steps_take_the_fused_layer_kernels_and_training_does_not(monkeypatch):
    from nf4lora.kernels import rms_norm, rope_cache, silu_mul, use_kernels

    model = _tiny(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to(KERNEL_DEVICE)
    calls = []
    for module, name in ((rms_norm, "rms_norm"), (rms_norm, "add_rms_norm"), (rope_cache, "rope_into_cache"),
                         (silu_mul, "silu_mul")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = _ids(2, 9, 50).to(KERNEL_DEVICE)
    outputs = {}
    for mode in ("triton", "reference"):
        with torch.no_grad(), use_kernels(mode):
            cache = model.new_cache(2, 12)
            steps = [model(x[:, :6], cache=cache)]  # causal prefill from slot 0, then decode steps
            steps += [model(x[:, i:i + 1], cache=cache) for i in range(6, 9)]
        outputs[mode] = torch.cat(steps, dim=1)
    layers = model.config.num_hidden_layers
    assert sorted(set(calls)) == ["add_rms_norm", "rms_norm", "rope_into_cache", "silu_mul"]
    # per step: one plain norm (the first layer's input), every later norm adds the residual that the layer before
    # left pending (the final norm included), so no residual add runs on its own
    assert calls.count("rope_into_cache") == 4 * layers and calls.count("rms_norm") == 4
    assert calls.count("add_rms_norm") == 4 * 2 * layers
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-5, atol=1e-5)
    calls.clear()
    with use_kernels("triton"):
        model.train()
        model.model.norm.weight.requires_grad_(True)
        model(x).float().pow(2).mean().backward()  # every layer's weights train: nothing may skip autograd
    assert calls == [] and model.model.norm.weight.grad is not None


def test_nf4_decode_step_groups_qkv_and_gate_up_into_one_launch_each(checkpoints, monkeypatch):
    from nf4lora.kernels import gemv_nf4, use_kernels
    from nf4lora.nf4.linear import NF4Linear

    model = load_model(checkpoints("gqa"), quantization="nf4", dtype=torch.float32, device=KERNEL_DEVICE)
    launches = []
    real = gemv_nf4.fused_matmul_parts
    monkeypatch.setattr(gemv_nf4, "fused_matmul_parts", lambda x, qs: launches.append(len(qs)) or real(x, qs))
    x = _ids(2, 1, 96).to(KERNEL_DEVICE)  # a batch-2 decode step: 2 rows of x per projection
    with torch.no_grad(), use_kernels("triton"):
        grouped = model(x)
        monkeypatch.setattr(NF4Linear, "forward_group", None)  # every projection on its own
        separate = model(x)
    assert launches == [3, 2] * model.config.num_hidden_layers
    torch.testing.assert_close(grouped, separate, rtol=1e-5, atol=1e-5)  # fp32: split-K order differs


def test_gradient_checkpointing_gives_identical_gradients(monkeypatch):
    from nf4lora.model import llama

    model = _tiny().train()
    x = _ids(2, 8, 50)
    # a checkpoint keeps its inputs for the recomputation: each layer's must be one tensor, with the residual the
    # layer before left pending already added (as many saved activations as a layer that adds it itself)
    pending_inputs = []
    real_checkpoint = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda fn, h, pending, *a, **k: pending_inputs.append(pending) or
                        real_checkpoint(fn, h, pending, *a, **k))

    def grads(checkpointing: bool):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(x).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert pending_inputs == [None] * model.config.num_hidden_layers
    assert plain.keys() == recomputed.keys()
    for name in plain:  # recomputation replays the exact same kernels on the same inputs
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)


def test_module_names_mirror_transformers():
    hf_keys = set(hf_model().state_dict())
    assert set(_tiny_from_base().state_dict()) == hf_keys


def _tiny_from_base() -> Llama:
    return Llama(LlamaConfig.from_hf_dict(hf_model().config.to_dict()))


def test_tied_embeddings_share_one_parameter(checkpoints):
    model = load_model(checkpoints("tied"), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_forward_rejects_bad_inputs():
    model = _tiny()
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=model.new_cache(1, 4))


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_modules_to_save_copies_of_the_head_or_embeddings_train_and_generate(checkpoints, saved):
    from nf4lora.lora import LoraConfig, ModulesToSave, inject_lora
    from nf4lora.model import generate

    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        before = model(x)
    tokens_before = generate(model, x, max_new_tokens=4)
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=[saved]))  # B = 0: same outputs
    wrapper = model.lm_head if saved == "lm_head" else model.model.embed_tokens
    assert isinstance(wrapper, ModulesToSave) and wrapper.weight is wrapper.modules_to_save["default"].weight
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert torch.equal(generate(model, x, max_new_tokens=4), tokens_before)
    model(x).logsumexp(-1).mean().backward()
    assert wrapper.modules_to_save["default"].weight.grad is not None
    assert wrapper.original_module.weight.grad is None
