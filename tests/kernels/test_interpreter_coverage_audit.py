"""Kernel cases the module tests left out (helper audit of the interpreter coverage against the kernels issue).

Each runs a Triton kernel against its reference on fresh random inputs, into poisoned memory (``poisoned``: NaN
floats, 0xA5 bytes) so that an unwritten element shows. Exact formats are compared bit for bit, float results
with the per-dtype tolerances of the module tests. bf16 outputs are checked on a GPU only: Triton 3.9's
interpreter truncates every float32 -> bf16 conversion (``kernel_helpers.skip_interpreter_bf16``), so even
element-wise bf16 outputs cannot match a round-to-nearest reference there; bf16 inputs are exact and run here.
"""

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import dequantize, quantize
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked-off lanes

# Relative Frobenius error against float64 on the same rounded operands, as in test_gemv_nf4: fp32 lands near
# 1e-7 (summation order), fp16 outputs are rounded once (2**-11 relative).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers, so that -0.0 and 0.0 differ (``torch.equal`` calls them equal)."""
    t = t.detach().cpu().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(q, ref) -> None:
    """Packed bytes, every state tensor (bit for bit) and the header of ``q`` equal those of ``ref``."""
    assert torch.equal(q.packed.cpu(), ref.packed.cpu())
    for name, t in ref.state.tensors().items():
        got = getattr(q.state, name)
        assert got.dtype == t.dtype and torch.equal(bits(got), bits(t)), name
    assert (q.shape, q.dtype, q.state.blocksize, q.state.quant_type, q.state.nested_blocksize) == (
        ref.shape, ref.dtype, ref.state.blocksize, ref.state.quant_type, ref.state.nested_blocksize)


def test_quantize_keeps_the_sign_of_a_zero_code(triton_mode, poisoned, device):
    """Custom codebooks that differ only in the sign of a zero entry (``-code`` of one holding 0.0) are two
    codebooks: each weight's state keeps its own, as the reference's does, and dequantizes to its zeros' sign.
    (The search tables were cached by the codes as Python floats, where -0.0 == 0.0, so the second codebook
    quantized with the first one's tables and recorded the first one's zero.)"""
    w = torch.randn(4, 64)
    w[0, :8] = 0.0  # elements that take the zero code
    code = torch.rand(16) * 2 - 1  # fresh values each run: a key no earlier test cached
    for zero in (0.0, -0.0):
        code[5] = zero
        q = quantize(w.to(device), 32, code=code.to(device))
        ref = quantize_ref(w, 32, code=code)
        assert_same_bits(q, ref)
        assert torch.equal(bits(dequantize(q, torch.float32)), bits(dequantize_ref(ref, torch.float32)))


@pytest.mark.parametrize(
    "blocksize, quant_type, double_quant, dtype, shape",
    [
        # the blocksizes no other test quantizes (32..256 and 4096 are in test_quantize_nf4): odd element counts
        # (byte stores, a padded last byte) and even ones (word stores), each with a partial last block
        (512, "nf4", True, torch.bfloat16, (3, 515)),
        (512, "custom", False, torch.float16, (2, 516)),
        (1024, "fp4", False, torch.float32, (3, 1027)),
        (1024, "custom", True, torch.bfloat16, (2, 1028)),
        (2048, "nf4", False, torch.float16, (3, 2051)),
        (2048, "fp4", True, torch.float32, (2, 2052)),
        # a custom codebook with an odd count, and one with a partial last block (the module test has neither)
        (32, "custom", False, torch.float32, (7, 33)),
        (64, "custom", True, torch.float16, (5, 1001)),
    ],
)
def test_quantize_bytes_and_dequantize_values_equal_reference(
    triton_mode, poisoned, device, blocksize, quant_type, double_quant, dtype, shape
):
    code = torch.rand(16) * 2 - 1 if quant_type == "custom" else None  # unsorted: the kernel's order lookup
    named = "nf4" if code is not None else quant_type  # a code overrides the name; "custom" is recorded
    w = torch.randn(shape).to(dtype)
    ref = quantize_ref(w, blocksize, named, double_quant, code=code)
    q = quantize(w.to(device), blocksize, named, double_quant, code=None if code is None else code.to(device))
    assert_same_bits(q, ref)
    for out_dtype in TOLERANCE:  # float32 and float16 outputs: bit for bit
        assert torch.equal(bits(dequantize(q, out_dtype)), bits(dequantize_ref(ref, out_dtype))), out_dtype


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_subnormal_weights_equal_reference_bytes(triton_mode, poisoned, device, double_quant):
    """Weights below float32's smallest normal number (1.2e-38): their absmax, scale and codes as the reference
    computes them without flushing to zero (a GPU kernel that flushed subnormals would store absmax 0)."""
    w = torch.randn(5, 100) * 1e-40
    ref = quantize_ref(w, 64, "nf4", double_quant)
    assert_same_bits(quantize(w.to(device), 64, "nf4", double_quant), ref)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().cpu().double() - ref).norm() / ref.norm())


def linear_ref(x, q, bias=None):
    """float64 ``F.linear`` on the operands the kernels see: the weight dequantized to x.dtype, bias rounded to it."""
    w = dequantize_ref(q.to("cpu"), x.dtype).double()
    return F.linear(x.cpu().double(), w, None if bias is None else bias.cpu().to(x.dtype).double())


def renested(q, nested_blocksize: int):
    """``q`` with its absmax double-quantized in nested blocks of ``nested_blocksize`` instead of 256: a layout a
    bitsandbytes checkpoint may declare (``nested_blocksize`` in its quant_state) and the kernels read."""
    import dataclasses

    from nf4lora.nf4.blockwise import quantize_blockwise
    from nf4lora.nf4.codebook import dynamic_map
    from nf4lora.nf4.tensor import QuantizedTensor

    absmax = q.state.absmax_float32()
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(signed=True), nested_blocksize)
    state = dataclasses.replace(q.state, absmax=codes, offset=offset, nested_absmax=nested_absmax,
                                nested_code=dynamic_map(signed=True), nested_blocksize=nested_blocksize)
    return QuantizedTensor(q.packed, state)


@pytest.mark.parametrize(
    "blocksize, nested_blocksize, N, K",
    [
        (32, 64, 24, 384),  # 288 blocks in 5 nested blocks, the last partial; TMA boxes of 128 blocks, one clipped
        (256, 4096, 20, 768),  # one nested block wider than all blocks; TMA stores at the widest box (16 x 256)
    ],
)
def test_dequantize_and_fused_kernels_read_any_nested_blocksize(
    triton_mode, poisoned, device, blocksize, nested_blocksize, N, K
):
    from nf4lora.kernels.dequantize_nf4 import dequantize_into
    from nf4lora.kernels.gemv_nf4 import fused_matmul

    q = renested(quantize_ref(torch.randn(N, K), blocksize, "nf4", True), nested_blocksize)
    qd = q.to(device)
    for dtype in TOLERANCE:
        expected = bits(dequantize_ref(q, dtype))
        for bulk_store in (True, False):  # the TMA-store kernel (the interpreter emulates TMA) and plain stores
            out = dequantize_into(qd, torch.empty(q.shape, dtype=dtype, device=device), bulk_store)
            assert torch.equal(bits(out), expected), (dtype, bulk_store)
    bias = torch.randn(N)
    for M, dtype in ((1, torch.float16), (2, torch.float32), (3, torch.float16)):  # both GEMVs, the tile kernel
        x = torch.randn(M, K).to(dtype)
        out = fused_matmul(x.to(device), qd, bias.to(device))
        assert not out.isnan().any(), "unwritten (poisoned) outputs"
        assert rel_err(out, linear_ref(x, q, bias)) < TOLERANCE[dtype], M


@pytest.mark.parametrize(
    "M, block_m, dtype",
    [
        (3, 2, torch.float32),  # two-row GEMV over two row programs, the second one's second row missing
        (5, 1, torch.float16),  # one-row GEMV, five row programs
        (17, None, torch.float32),  # tile kernel over two 16-row tiles
    ],
)
def test_split_k_sums_each_row_program_s_partials_on_its_own_counters(
    poisoned, device, split_k_counts, M, block_m, dtype
):
    """Split-K with more than one program along M: each (row program, column tile) has its own arrival counter
    and partial rows, so every output row gets all of its K chunks once (the module tests split K with one row
    program only), and the counters are left at zero."""
    from nf4lora.kernels import gemv_nf4

    q = quantize_ref(torch.randn(24, 2112), 64, "nf4", True)
    x, bias = torch.randn(M, 2112).to(dtype), torch.randn(24)
    out = gemv_nf4.fused_matmul(x.to(device), q.to(device), bias.to(device), block_m)
    assert split_k_counts[0] > 1
    assert not out.isnan().any(), "unwritten (poisoned) outputs"
    assert rel_err(out, linear_ref(x, q, bias)) < TOLERANCE[dtype]
    assert int(gemv_nf4.arrival_counters(1, out.device).count_nonzero()) == 0


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_large_m_tile_kernel_at_block_m_128_covers_a_partial_second_tile(poisoned, device, dtype):
    from nf4lora.kernels.gemv_nf4 import fused_matmul

    q = quantize_ref(torch.randn(40, 128), 64, "fp4", True)
    x, bias = torch.randn(130, 128).to(dtype), torch.randn(40)  # 130 rows: a full 128-row tile and 2 rows
    out = fused_matmul(x.to(device), q.to(device), bias.to(device), block_m=128)
    assert not out.isnan().any(), "unwritten (poisoned) outputs"
    assert rel_err(out, linear_ref(x, q, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("offset", [1, 2])  # 2 and 4 bytes past an 8-byte boundary
def test_fused_kernels_take_an_x_that_does_not_start_on_an_8_byte_boundary(device, offset):
    """The GEMVs read x as 8-byte words, so an x view that starts off such a boundary (a slice of a larger fp16
    buffer) is copied first; the two-row GEMV and the multi-weight kernel give the reference's product too."""
    from nf4lora.kernels.gemv_nf4 import fused_matmul, fused_matmul_parts

    weights = [quantize_ref(torch.randn(n, 128), 64, "nf4", True) for n in (40, 24)]
    base = torch.randn(2 * 128 + offset, dtype=torch.float16, device=device)
    x = base[offset:].view(2, 128)
    assert x.storage_offset() * x.element_size() % 8
    out = fused_matmul(x, weights[0].to(device))
    assert rel_err(out, linear_ref(x, weights[0])) < TOLERANCE[torch.float16]
    parts = fused_matmul_parts(x[:1], [q.to(device) for q in weights])
    expected = torch.cat([linear_ref(x[:1], q) for q in weights], dim=1)
    assert rel_err(parts, expected) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("M, K", [(3, 128), (17, 128), (2, 65)])  # fused forward; dequantize + GEMM both ways
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_nf4_linear_backward_dequantizes_again_into_a_poisoned_workspace(triton_mode, poisoned, device, M, K, dtype):
    """grad_input dequantizes the weight again into the shared workspace: poisoned between forward and backward,
    so that a backward reusing what the forward (or another layer) left there shows as NaN, not as the right
    values; forward and gradients match float64 F.linear on the same operands."""
    from nf4lora.kernels import nf4_linear
    from nf4lora.kernels.matmul_nf4 import release_workspaces, workspace

    release_workspaces()  # the next workspace is allocated through the poisoned torch.empty
    q = quantize_ref(torch.randn(40, K)).to(device)
    x = torch.randn(M, K).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(40).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(M, 40).to(device=device, dtype=dtype)
    y = nf4_linear(x, q, bias)
    workspace(q.shape, dtype, q.device).fill_(float("nan"))
    y.backward(grad_out)
    w = dequantize_ref(q.to("cpu"), dtype).double()
    assert rel_err(y, linear_ref(x.detach(), q, bias.detach())) < TOLERANCE[dtype]
    assert rel_err(x.grad, grad_out.cpu().double() @ w) < TOLERANCE[dtype]
    assert rel_err(bias.grad, grad_out.cpu().double().sum(0)) < TOLERANCE[dtype]
    release_workspaces()


@pytest.mark.parametrize(
    "B, H, H_kv, L, dtype, masked",
    [
        (1, 32, 1, 130, torch.float32, True),  # 32 query heads a kv head: the dot's M side padded to 32, not 16
        (2, 64, 2, 70, torch.float16, False),  # 32 a kv head over two, two sequences
        (2, 4, 4, 1, torch.float32, True),  # a single cached key (the L == 1 specialization)
    ],
)
def test_decode_attention_with_many_query_heads_per_kv_head_or_one_key(poisoned, device, B, H, H_kv, L, dtype, masked):
    from nf4lora.kernels.decode_attention import decode_attention

    q = torch.randn(B, H, 1, 16, device=device).to(dtype)
    k, v = (torch.randn(B, H_kv, L, 16, device=device).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, L, device=device) < 0.5
        mask[..., 0] = True  # every sequence attends at least one key
    out = decode_attention(q, k, v, mask)
    assert out.shape == (B, H, 1, 16) and out.dtype == dtype and not out.isnan().any()
    kr, vr = (t.double().repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.double(), kr, vr, attn_mask=mask)
    assert rel_err(out, ref.cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "B, T, H, H_kv, D, dtype",
    [(2, 3, 4, 4, 48, torch.float16), (1, 17, 2, 1, 32, torch.float32)],  # D not a power of two; 17 tokens
)
def test_rope_into_cache_writes_every_rotated_query_over_poisoned_memory(poisoned, device, B, T, H, H_kv, D, dtype):
    """The rotated queries (a new tensor, here poisoned) and the written cache slots, at scattered positions, equal
    the eager ops bit for bit (the module test allocates without poisoning)."""
    from nf4lora.kernels.rope_cache import rope_into_cache, rope_into_cache_reference
    from nf4lora.model.config import LlamaConfig
    from nf4lora.model.rope import rope_cos_sin, rope_inv_freq

    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, device=device).to(dtype)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D)
    cos, sin = rope_cos_sin(rope_inv_freq(config, device), torch.randint(0, 500, (B, T), device=device), dtype)
    caches = [torch.randn(B, H_kv, 20, D, device=device).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    position = torch.randperm(20, device=device)[:T]
    q_rot = rope_into_cache(q, k, v, cos, sin, *caches, position)
    assert torch.equal(q_rot, rope_into_cache_reference(q, k, v, cos, sin, *ref_caches, position))
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


@pytest.mark.parametrize(
    "shape, dtype, weight_dtype",
    [((5, 1), torch.float32, torch.float16), ((2, 3, 1023), torch.float16, torch.float32)],
)
def test_rms_norm_promotes_mixed_weights_and_reads_a_strided_delta(poisoned, device, shape, dtype, weight_dtype):
    """One feature a row, and a row one short of the block; a half weight with a float32 x promotes to float32 (the
    module tests promote the other way only); add_rms_norm's delta a strided view; outputs allocated poisoned."""
    from nf4lora.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_reference

    ulp = {torch.float32: 2e-6, torch.float16: 1e-3}[dtype]  # test_rms_norm's: one unit in the last place of x.dtype
    x = torch.randn(shape, device=device).to(dtype) * 3
    delta = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
    weight = torch.randn(shape[-1], device=device).to(weight_dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.promote_types(dtype, weight_dtype)
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-5), rtol=ulp, atol=ulp)
    total, out = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(out, rms_norm_reference(x + delta, weight, 1e-5), rtol=ulp, atol=ulp)
