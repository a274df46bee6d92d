import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import skip_interpreter_bf16

from nf4lora.kernels.decode_attention import MAX_BATCH_HEADS, decode_attention, preferred, supports

# Relative error against float64 SDPA on the same inputs: fp32 ~1e-7; fp16 rounds the probabilities to fp16 for
# the value product (as flash attention does) and the output once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


@pytest.mark.parametrize(
    "B, H, H_kv, L, D, mask_kind",
    [
        (1, 4, 4, 64, 64, None),  # one chunk, no mask
        (2, 4, 2, 300, 64, "random"),  # GQA, several chunks, the last ragged
        (3, 6, 2, 1000, 32, "prefix"),  # only the first keys valid: later chunks see no live key at all
        (2, 8, 1, 200, 16, "shared"),  # multi-query, one mask row for the batch
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention_matches_sdpa(poisoned, device, B, H, H_kv, L, D, mask_kind, dtype):
    skip_interpreter_bf16(device, dtype)
    q = torch.randn(B, H, 1, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, H_kv, L, D, dtype=dtype, device=device) for _ in range(2))
    mask = {
        None: None,
        "random": torch.rand(B, 1, 1, L, device=device) < 0.6,
        "prefix": (torch.arange(L, device=device) < 37).expand(B, 1, 1, L).contiguous(),
        "shared": torch.rand(1, 1, 1, L, device=device) < 0.5,
    }[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # every query attends at least one key
    out = decode_attention(q, k, v, mask)
    assert out.shape == (B, H, 1, D) and out.dtype == dtype
    assert not out.isnan().any()
    ref = reference(q, k, v, mask)
    assert float((out.double() - ref).norm() / ref.norm()) < TOLERANCE[dtype]


def test_decode_attention_reads_strided_views(device):
    # q as the model makes it: (B, T, H, D) transposed; k, v the first slots of a longer cache
    q = torch.randn(2, 1, 4, 32, device=device).transpose(1, 2)
    cache_k, cache_v = (torch.randn(2, 2, 96, 32, device=device) for _ in range(2))
    k, v = cache_k[:, :, :80], cache_v[:, :, :80]
    out = decode_attention(q, k, v)
    ref = reference(q, k, v, None)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_supports_and_refusals(device):
    q = torch.randn(1, 4, 1, 64, device=device)
    k = torch.randn(1, 2, 50, 64, device=device)
    assert supports(q, k, k, None) and supports(q, k, k, torch.ones(1, 1, 1, 50, dtype=torch.bool, device=device))
    assert not supports(q.expand(1, 4, 2, 64), k, k, None)  # two query rows: SDPA's case
    assert not supports(q[..., :48], k[..., :48], k[..., :48], None)  # head_dim 48
    assert not supports(q, k, k, torch.zeros(1, 1, 1, 50, device=device))  # additive float mask
    assert not supports(q, torch.randn(1, 3, 50, 64, device=device), torch.randn(1, 3, 50, 64, device=device), None)
    with pytest.raises(ValueError, match=r"decode_attention takes q \(B, H, 1, D\).*got q \(1, 4, 1, 48\)"):
        decode_attention(q[..., :48], k[..., :48], k[..., :48])


def test_preferred_up_to_max_batch_heads(device):
    q = torch.randn(8, 32, 1, 64, device=device)
    k = torch.randn(8, 8, 40, 64, device=device)
    assert 8 * 8 <= MAX_BATCH_HEADS < 8 * 32
    assert preferred(q, k, k, None)  # 64 (sequence, kv head) pairs
    k = torch.randn(8, 32, 40, 64, device=device)
    assert supports(q, k, k, None) and not preferred(q, k, k, None)  # 256: SDPA measured faster
    assert not preferred(q[..., :48], k[..., :48], k[..., :48], None)  # unsupported


def test_decode_attention_combines_more_chunks_than_one_block(device, monkeypatch):
    from nf4lora.kernels import decode_attention as module

    monkeypatch.setattr(module, "PROGRAMS_PER_SM", 64)  # 32 chunks of 128 keys: two blocks of the combining launch
    q = torch.randn(1, 2, 1, 16, device=device)
    k, v = (torch.randn(1, 1, 4096, 16, device=device) for _ in range(2))
    mask = (torch.rand(1, 1, 1, 4096, device=device) < 0.02) | (torch.arange(4096, device=device) == 4000)
    k[0, 0, 4000] = 100 * q[0, 0, 0]  # a score of ~400 in the second block of chunks: exp overflows unless shifted
    out = decode_attention(q, k, v, mask)  # most chunks hold one or no live key
    assert float((out.double() - reference(q, k, v, mask)).norm() / reference(q, k, v, mask).norm()) < 1e-5
