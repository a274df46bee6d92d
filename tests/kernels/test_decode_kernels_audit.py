"""Edge cases of the decode-step kernels (attention, RoPE + cache write) and of the model's choice to take them."""

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import use_kernels
from nf4lora.kernels.decode_attention import decode_attention, supports
from nf4lora.kernels.rms_norm import add_rms_norm, rms_norm
from nf4lora.kernels.rope_cache import rope_into_cache
from nf4lora.kernels.silu_mul import silu_mul
from nf4lora.model import Llama, LlamaConfig
from nf4lora.model.llama import RMSNorm
from nf4lora.model.rope import rope_cos_sin


@pytest.mark.parametrize("L", [40, 300])  # one chunk; three chunks and the combining launch
def test_decode_attention_gives_zeros_for_a_sequence_with_no_key_as_sdpa_does(poisoned, device, L):
    q = torch.randn(2, 2, 1, 16, device=device)
    k, v = (torch.randn(2, 1, L, 16, device=device) for _ in range(2))
    mask = torch.ones(2, 1, 1, L, dtype=torch.bool, device=device)
    mask[1] = False  # a fully padded sequence: SDPA returns zeros for it, not NaN
    expected = F.scaled_dot_product_attention(q, k.expand(2, 2, L, 16), v.expand(2, 2, L, 16), attn_mask=mask)
    out = decode_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_empty_and_split_device_inputs(device):
    q = torch.randn(2, 4, 1, 16, device=device)
    k = torch.randn(2, 2, 8, 16, device=device)
    empty = {"no keys": (q, k[:, :, :0]), "no sequence": (q[:0], k[:0]), "no kv head": (q, k[:, :0])}
    for name, (q_, k_) in empty.items():
        assert not supports(q_, k_, k_, None), name  # SDPA's case: the kernel's grid would divide by zero
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert not supports(q, k, k, mask.to("meta"))
    assert not supports(q, k, k.to("meta"), None)
    with pytest.raises(ValueError, match=r"decode_attention takes .*got q \(2, 4, 1, 16\).*k \(2, 2, 0, 16\)"):
        decode_attention(q, k[:, :, :0], k[:, :, :0])


def _rope_inputs(device):
    """q (1, 2, 2, 16), k and v (1, 2, 1, 16), cos and sin (1, 2, 16), float32."""
    q, k, v = (torch.randn(1, 2, heads, 16, device=device) for heads in (2, 1, 1))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, device=device).float() / 16)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(2, device=device)[None], torch.float32)
    return q, k, v, cos, sin


def test_rope_into_cache_writes_nothing_outside_the_cache(device):
    q, k, v, cos, sin = _rope_inputs(device)
    # the caches are the first 4 slots of a longer buffer, so a write past slot 3 lands in the guard slots
    buffer = torch.zeros(2, 1, 1, 6, 16, device=device)
    k_cache, v_cache = buffer[0, :, :, :4], buffer[1, :, :, :4]
    rope_into_cache(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([3, 4], device=device))
    assert k_cache[:, :, 3].abs().sum() > 0  # the slot inside the cache is written
    assert torch.equal(buffer[:, :, :, 4:], torch.zeros_like(buffer[:, :, :, 4:]))


def test_rope_into_cache_refuses_a_cache_position_of_another_length_or_a_sin_unlike_cos(device):
    q, k, v, cos, sin = _rope_inputs(device)
    caches = [torch.zeros(1, 1, 4, 16, device=device) for _ in range(2)]
    with pytest.raises(ValueError, match=r"cache_position must be \(T,\) = \(2,\) int64 slots; got \(1,\) torch.int64"):
        rope_into_cache(q, k, v, cos, sin, *caches, torch.tensor([0], device=device))
    with pytest.raises(ValueError, match=r"cache_position must be .* int64 slots; got \(2,\) torch.int32"):
        rope_into_cache(q, k, v, cos, sin, *caches, torch.tensor([0, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"rope_into_cache takes .*sin \(1, 2, 16\) torch.float64"):
        rope_into_cache(q, k, v, cos, sin.double(), *caches, torch.tensor([0, 1], device=device))


def _tiny_llama(device):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return Llama(config).to(device).eval().requires_grad_(False)


# A layer whose only trained weight feeds a fused kernel's second input (up but not gate; v but not q) must keep its
# gradient: the kernels have no autograd, so the model may take them only when none of their inputs needs one.
@pytest.mark.parametrize("trained", ["mlp.up_proj", "self_attn.v_proj"])
def test_a_trained_projection_behind_a_fused_kernel_keeps_its_gradient(device, trained):
    model = _tiny_llama(device)
    weight = model.get_submodule(f"model.layers.0.{trained}").weight.requires_grad_(True)
    x = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1)).to(device)
    grads = {}
    for mode in ("triton", "reference"):
        with use_kernels(mode):
            cache = model.new_cache(1, 8)
            model(x[:, :4], cache=cache)  # prefill, then a decode step (decode attention on the Triton path)
            loss = model(x[:, 4:], cache=cache).pow(2).mean()
        grads[mode] = torch.autograd.grad(loss, weight)[0]
    # fp32, the same math: only the kernels' reduction orders differ (~1e-7 relative)
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-5, atol=1e-7)


def test_rms_norm_with_a_residual_that_needs_a_gradient_keeps_it(device):
    norm = RMSNorm(16).to(device).requires_grad_(False)
    residual = torch.randn(2, 16, device=device, requires_grad=True)
    with use_kernels("triton"):
        total, out = norm(torch.randn(2, 16, device=device), residual=residual)
    assert total.requires_grad and out.requires_grad


def test_refusals_name_a_tensor_on_another_device(device):
    x, elsewhere = torch.randn(2, 16, device=device), torch.randn(2, 16, device="meta")
    with pytest.raises(ValueError, match=r"rms_norm takes .* one device.*weight \(16,\) torch.float32 meta"):
        rms_norm(x, elsewhere[0], 1e-6)
    with pytest.raises(ValueError, match=r"rms_norm takes .*delta \(2, 16\) torch.float32 meta"):
        add_rms_norm(x, elsewhere, torch.ones(16, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"silu_mul takes .* one device.*up \(2, 16\) torch.float32 meta"):
        silu_mul(x, elsewhere)
    q, k, v, cos, sin = _rope_inputs(device)
    caches = [torch.zeros(1, 1, 4, 16, device="meta") for _ in range(2)]
    with pytest.raises(ValueError, match=r"rope_into_cache takes .*k_cache \(1, 1, 4, 16\) torch.float32 meta"):
        rope_into_cache(q, k, v, cos, sin, *caches, torch.tensor([0, 1], device=device))
