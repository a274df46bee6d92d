import pytest
import torch
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels.rope_cache import rope_into_cache, rope_into_cache_reference, supports
from nf4lora.model.config import LlamaConfig
from nf4lora.model.rope import rope_cos_sin, rope_inv_freq


def _inputs(B, T, H, H_kv, D, L, dtype, device):
    # q, k, v as the model slices them from one grouped projection output (strided rows)
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, dtype=dtype, device=device)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D)
    positions = torch.randint(0, 500, (B, T), device=device)
    cos, sin = rope_cos_sin(rope_inv_freq(config, device), positions, dtype)
    caches = [torch.randn(B, H_kv, L, D, dtype=dtype, device=device) for _ in range(2)]
    return q, k, v, cos, sin, caches


@pytest.mark.parametrize("B, T, H, H_kv, D, slots", [(1, 1, 4, 2, 64, [7]), (2, 3, 6, 3, 80, [0, 5, 2]), (3, 5, 2, 1, 16, None)])
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_rope_into_cache_equals_the_eager_ops(device, B, T, H, H_kv, D, slots, dtype):
    skip_interpreter_bf16(device, dtype)
    q, k, v, cos, sin, caches = _inputs(B, T, H, H_kv, D, 12, dtype, device)
    position = torch.tensor(slots, device=device) if slots else torch.arange(T, device=device)
    ref_caches = [c.clone() for c in caches]
    q_rot = rope_into_cache(q, k, v, cos, sin, *caches, position)
    q_ref = rope_into_cache_reference(q, k, v, cos, sin, *ref_caches, position)
    assert q_rot.shape == (B, H, T, D) and q_rot.is_contiguous()
    # the eager expression's roundings, step by step: bitwise equal, untouched cache slots included
    assert torch.equal(q_rot, q_ref)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


def test_refuses_mismatched_caches(device):
    q, k, v, cos, sin, caches = _inputs(1, 1, 4, 2, 32, 8, torch.float32, device)
    assert not supports(q, k, v, cos, caches[0].half(), caches[1].half())
    assert not supports(q, k, v, cos, caches[0][:, :1], caches[1][:, :1])
    with pytest.raises(ValueError, match="rope_into_cache takes"):
        rope_into_cache(q, k, v, cos, sin, caches[0].half(), caches[1].half(), torch.tensor([0]))
