import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels import dispatch, gemv_nf4
from nf4lora.kernels.gemv_nf4 import arrival_counters, fused_matmul, fused_matmul_parts, parts_supported, split_k_chunk
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref

# Relative Frobenius error against float64 on the same rounded operands (the dequantized weight in
# x.dtype, as the reference computes it): fp32 lands near 1e-7 (order-of-summation rounding), so 1e-5
# is loose; fp16/bf16 outputs are rounded once, 2**-11 / 2**-8 relative, so 2e-3 / 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x, q, bias):
    w = dequantize_ref(q.to("cpu"), x.dtype).double()
    return F.linear(x.cpu().double(), w, None if bias is None else bias.cpu().to(x.dtype).double())


def rel_err(out, ref):
    return float((out.cpu().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize(
    "M, N, K, blocksize, double_quant, block_m",
    [
        (1, 40, 96, 32, True, None),  # GEMV, 8 blocks a step, the only step ragged (12 of 32 words)
        (1, 300, 192, 64, False, None),  # GEMV, N over several row tiles
        (1, 24, 2112, 64, True, None),  # GEMV split-K: three K chunks, the last one ragged
        (1, 20, 384, 128, False, None),  # GEMV, 2 blocks a step
        (1, 16, 512, 256, True, None),  # GEMV, one block a step
        (1, 8, 2048, 1024, True, None),  # GEMV, a block over four steps (and split-K)
        (2, 300, 192, 64, True, None),  # two-row GEMV
        (2, 24, 2112, 64, False, None),  # two-row GEMV with split-K
        (3, 20, 384, 128, True, 2),  # two-row GEMV over two programs, the second one's second row missing
        (3, 16, 512, 256, False, 1),  # one-row GEMV, a program per row
        (3, 40, 96, 32, False, None),  # tensor-core tile with 13 padded rows
        (17, 33, 192, 64, True, None),  # two M tiles, N not a multiple of the tile
        (3, 24, 2112, 64, True, None),  # tile kernel with split-K
        (4, 24, 1024, 256, False, None),  # tile kernel, a block over four steps (each scaled on its own)
        (5, 64, 256, 128, True, 64),  # the large-M fused tiling
    ],
)
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_matmul_matches_reference(poisoned, device, M, N, K, blocksize, double_quant, block_m, dtype, with_bias):
    skip_interpreter_bf16(device, dtype)
    q = quantize_ref(torch.randn(N, K), blocksize, "nf4", double_quant)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N) if with_bias else None  # float32 bias with a lower-precision x: cast like F.linear
    out = fused_matmul(x.to(device), q.to(device), None if bias is None else bias.to(device), block_m)
    assert out.shape == (M, N) and out.dtype == dtype
    assert not out.isnan().any(), "unwritten (poisoned) outputs"
    assert rel_err(out, reference(x, q, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "rows, part_rows, n_splits, expected",
    # the fastest config at each on one H200, 132 multiprocessors (benchmarks/results/2026-11-30_gemv-hopper-rule_h200.md)
    [
        (1, [4096], 4, (32, 2)), (1, [11008], 2, (32, 2)), (1, [28672], 4, (32, 2)), (1, [4096] * 3, 2, (32, 2)),
        (1, [11008] * 2, 2, (32, 2)), (1, [1024], 4, (16, 1)), (1, [2048], 2, (16, 1)), (1, [7168], 4, (64, 4)),
        (2, [4096], 4, (32, 2)), (2, [11008], 2, (64, 4)), (2, [14336], 2, (32, 2)), (2, [4096] * 3, 2, (64, 4)),
        (2, [28672] * 2, 4, (64, 4)), (2, [2048, 256, 256], 2, (16, 1)), (2, [8192], 2, (32, 2)),
    ],
)
def test_hopper_gemv_config_picks_by_the_grid(rows, part_rows, n_splits, expected):
    assert gemv_nf4.hopper_gemv_config(rows, part_rows, n_splits, 132) == expected


@pytest.mark.parametrize("hopper", [True, False])
def test_gemv_runs_hopper_gemv_config_untuned_on_hopper_only(monkeypatch, hopper):
    monkeypatch.setattr(gemv_nf4, "is_hopper", lambda device: hopper)
    monkeypatch.setattr(gemv_nf4, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)  # the GPU's tuning space, not the interpreter's one
    x = torch.empty(1)
    single = (gemv_nf4._gemv_kernel, {"x_ptr": x, "N": 14336, "K_WORDS": 512, "CHUNK_WORDS": 256}, [14336])
    parts = (gemv_nf4._gemv_parts_kernel, {"x_ptr": x, "N_0": 2048, "N_1": 256, "N_2": 256, "K_WORDS": 256,
                                           "CHUNK_WORDS": 128}, [2048, 256, 256])
    for kernel, named_args, part_rows in (single, parts):
        n_splits = named_args["K_WORDS"] // named_args["CHUNK_WORDS"]
        for rows in (1, 2):
            pruned = gemv_nf4._prune_gemv(kernel.configs, named_args, ROWS=rows, SUB_W=32)
            picked = [(c.kwargs["BLOCK_N"], c.num_warps) for c in pruned]
            if hopper:
                assert picked == [gemv_nf4.hopper_gemv_config(rows, part_rows, n_splits, 132)]
            else:  # every config whose accumulators fit is tuned
                assert picked == [(n, w) for n, w in gemv_nf4.GEMV_CONFIGS if rows * n <= gemv_nf4.GEMV_MAX_ACC * w]


@pytest.mark.parametrize("block_m", [1, 2, 16])
def test_split_k_chunks_are_aligned_and_cover_k(device, block_m):
    expected = {  # (N, K): the chunk multiple for the GEMV (M = 1, 2) and for the tile kernel
        (64, 4096): (1024, 256), (3, 2112): (1024, 256), (4096, 11008): (2048, 1024),
        (11008, 4096): (2048, 512), (28672, 8192): (2048, 2048),
    }
    for (N, K), (gemv_align, tile_align) in expected.items():
        align = gemv_align if block_m in (1, 2) else tile_align
        chunk = split_k_chunk(block_m, N, K, block_m, device)
        assert chunk % align == 0 and 0 < chunk < K + align, (N, K, chunk)


def test_fused_matmul_is_deterministic(device):
    q = quantize_ref(torch.randn(24, 2112)).to(device)
    x = torch.randn(2, 2112, device=device)
    assert torch.equal(fused_matmul(x, q), fused_matmul(x, q))


def test_split_k_leaves_its_arrival_counters_at_zero(device):
    # the last split of a tile resets its counter; a stale count would make the next call skip the sum
    q = quantize_ref(torch.randn(24, 2112)).to(device)
    for M in (1, 2, 3):  # one-row GEMV, two-row GEMV, tile kernel: all three split K here
        x = torch.randn(M, 2112, device=device)
        first = fused_matmul(x, q)
        assert int(arrival_counters(1, x.device).count_nonzero()) == 0
        assert torch.equal(first, fused_matmul(x, q))


def test_fused_matmul_refuses_unaligned_k_and_unknown_tiling(device):
    for K in (65, 100):  # not whole words; whole words but not whole blocks
        q = quantize_ref(torch.randn(8, K)).to(device)
        with pytest.raises(ValueError, match=f"divisible by 8 and by the blocksize 64, got K={K}"):
            fused_matmul(torch.randn(1, K, device=device), q)
    q = quantize_ref(torch.randn(8, 64)).to(device)
    with pytest.raises(ValueError, match=r"block_m=32 has no configs; valid: \[1, 2, 16, 64, 128\]"):
        fused_matmul(torch.randn(1, 64, device=device), q, block_m=32)


@pytest.mark.parametrize(
    "M, rows, K, blocksize, double_quant",
    [
        (1, (40, 24, 8), 2112, 64, True),  # three parts, split-K with a ragged last chunk
        (2, (64, 17), 2112, 64, False),  # two parts (the third has 0 rows), a part not a whole tile
        (2, (3, 5, 130), 384, 128, True),  # parts smaller than a tile, no split-K
        (1, (16, 16, 16), 96, 32, False),
    ],
)
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_fused_matmul_parts_matches_reference(poisoned, device, M, rows, K, blocksize, double_quant, dtype):
    skip_interpreter_bf16(device, dtype)
    # each part keeps its own codebook: the middle one is FP4
    weights = [quantize_ref(torch.randn(n, K), blocksize, "fp4" if i == 1 else "nf4", double_quant)
               for i, n in enumerate(rows)]
    x = torch.randn(M, K).to(dtype)
    out = fused_matmul_parts(x.to(device), [q.to(device) for q in weights])
    assert out.shape == (M, sum(rows)) and out.dtype == dtype
    assert not out.isnan().any(), "unwritten (poisoned) outputs"
    expected = torch.cat([reference(x, q, None) for q in weights], dim=1)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    assert int(arrival_counters(1, out.device).count_nonzero()) == 0


def test_parts_supported_refuses_what_the_kernel_cannot_take(device):
    x = torch.randn(1, 128, device=device)
    q64, q128 = (quantize_ref(torch.randn(8, 128), blocksize).to(device) for blocksize in (64, 128))
    assert parts_supported(x, [q64, q64]) and parts_supported(x.repeat(2, 1), [q64, q64, q64])
    assert not parts_supported(x.repeat(3, 1), [q64, q64])  # 3 rows: the tile kernel's M
    assert not parts_supported(x, [q64])  # one weight
    assert not parts_supported(x, [q64, q128])  # two blocksizes
    assert not parts_supported(x, [q64, quantize_ref(torch.randn(8, 64)).to(device)])  # two K
    with pytest.raises(ValueError, match=r"1 or 2 rows of x and 2 or 3 weights .* got x \(3, 128\)"):
        fused_matmul_parts(x.repeat(3, 1), [q64, q64])


@pytest.mark.parametrize("M", [1, 2, 3])  # one-row GEMV, two-row GEMV, tile kernel
@pytest.mark.parametrize("code", ["fp4", "random"])
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_fused_kernels_read_any_16_value_codebook(poisoned, device, M, code, dtype):
    """Both fused kernels look codes up in ``state.code``, not a built-in NF4 table: FP4 and an unsorted random
    codebook give the reference's product, on the GEMV and on the tile kernel (whose 16-bit lookup differs)."""
    skip_interpreter_bf16(device, dtype)
    custom = torch.rand(16) * 2 - 1 if code == "random" else None
    q = quantize_ref(torch.randn(40, 128), 64, "nf4" if custom is not None else code, True, code=custom)
    x = torch.randn(M, 128).to(dtype)
    out = fused_matmul(x.to(device), q.to(device))
    assert not out.isnan().any(), "unwritten (poisoned) outputs"
    assert rel_err(out, reference(x, q, None)) < TOLERANCE[dtype]


@pytest.mark.parametrize("M", [1, 2, 3])
def test_split_k_cases_cut_k_and_sum_every_chunk_once(device, split_k_counts, M):
    """The (24, 2112) weight of the split-K cases above is really cut into chunks of K on either kernel (3 on the
    GEMV, 9 on the tile kernel), so those cases test the cross-program sum; it takes each chunk once, the bias once."""
    q = quantize_ref(torch.randn(24, 2112))
    x, bias = torch.randn(M, 2112), torch.randn(24) * 100
    out = fused_matmul(x.to(device), q.to(device), bias.to(device))
    assert split_k_counts == [3 if M < 3 else 9]
    assert rel_err(out, reference(x, q, bias)) < TOLERANCE[torch.float32]
