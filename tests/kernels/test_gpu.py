"""The Triton kernels compiled for a GPU, with their autotuned configs, at model-like sizes and in bf16
(which the CPU interpreter cannot check). Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from nf4lora.kernels import dequantize, dequantize_nf4, nf4_linear, quantize
from nf4lora.kernels.reference import dequantize_reference, quantize_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1024, 4096), (1000, 4100), (333, 777)])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_gpu_quantize_bytes_and_dequantize_values_equal_reference(shape, quant_type, double_quant):
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = quantize(w, 64, quant_type, double_quant)
    ref = quantize_reference(w, 64, quant_type, double_quant)
    assert torch.equal(q.packed, ref.packed)
    for name, t in ref.state.tensors().items():
        assert torch.equal(getattr(q.state, name), t), name
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(dequantize(q, dtype), dequantize_reference(q, dtype))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dequantize_tma_and_plain_stores_equal_reference(blocksize, dtype):
    # 1000 x 4160 fills 1015.6 of the TMA kernel's 4096-element boxes at every blocksize: the last one is clipped
    q = quantize(torch.randn(1000, 4160, device="cuda", dtype=torch.bfloat16), blocksize)
    ref = dequantize_reference(q, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    assert dequantize_nf4.tma_store_fits(blocksize, q.numel(), out) == (blocksize <= 256)
    assert torch.equal(dequantize_nf4.dequantize_into(q, out), ref)
    out.fill_(float("nan"))
    assert torch.equal(dequantize_nf4.dequantize_into(q, out, bulk_store=False), ref)


@pytest.mark.parametrize("M", [1, 2, 3, 8, 16, 17, 300])
@pytest.mark.parametrize("K", [4096, 4160, 4097])  # aligned, blocks straddling rows, odd (dequantize path)
def test_gpu_bf16_nf4_linear_forward_and_backward_match_reference(M, K):
    N = 1000
    q = quantize(torch.randn(N, K, device="cuda"))
    w = dequantize_reference(q, torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y = nf4_linear(x, q, bias)
    gx, gb = torch.autograd.grad(y, (x, bias), g)
    xd, wd = x.detach().double(), w.double()
    for out, ref in ((y, F.linear(xd, wd, bias.detach().double())), (gx, g.double() @ wd), (gb, g.double().sum(0))):
        # bf16 output rounding (2**-8 relative) plus fp32 accumulation: 1e-2
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("M", [1, 5])
def test_gpu_fused_kernels_take_fp32_and_fp16_inputs(M, dtype, tolerance):
    # the GEMV (M = 1) and tile kernel (M = 5) compile a separate x path per input dtype
    q = quantize(torch.randn(1000, 4096, device="cuda"))
    x = torch.randn(M, 4096, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), dequantize_reference(q, dtype).double())
    y = nf4_linear(x, q)
    assert y.dtype == dtype and float((y.double() - ref).norm() / ref.norm()) < tolerance


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "random"])
def test_gpu_tile_kernel_byte_permute_lookup_reads_any_codebook(dtype, tolerance, quant_type):
    # the tensor-core kernel looks 16-bit codes up with byte permutes over tables built from state.code:
    # every code index, signs and both halves of each word must come out right, for any 16 values
    from nf4lora.kernels.gemv_nf4 import fused_matmul
    from nf4lora.nf4.tensor import quantize as quantize_ref

    w = torch.randn(520, 1024)
    code = torch.rand(16) * 2 - 1 if quant_type == "random" else None
    q = quantize_ref(w, 64, "nf4" if code is not None else quant_type, True, code=code).to("cuda")
    x = torch.randn(16, 1024, device="cuda", dtype=dtype)
    ref = F.linear(x.double(), dequantize_reference(q, dtype).double())
    for block_m in (16, 64):
        y = fused_matmul(x, q, None, block_m)
        assert float((y.double() - ref).norm() / ref.norm()) < tolerance, block_m


@pytest.mark.parametrize("M", [1, 2, 8])
def test_gpu_split_k_last_arrival_sum_is_right_and_deterministic(M):
    # hundreds of tiles, each summed by whichever of its splits the GPU finishes last, relaunched many
    # times: a lost partial, a stale read or a counter left non-zero would change some output
    from nf4lora.kernels.gemv_nf4 import arrival_counters, default_block_m, split_k_chunk

    N, K = 11008, 4096
    assert split_k_chunk(M, N, K, default_block_m(M), torch.device("cuda")) < K  # split-K runs
    q = quantize(torch.randn(N, K, device="cuda"))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    first = nf4_linear(x, q, bias)
    ref = F.linear(x.double(), dequantize_reference(q, torch.bfloat16).double(), bias.double())
    assert float((first.double() - ref).norm() / ref.norm()) < 1e-2
    assert all(torch.equal(nf4_linear(x, q, bias), first) for _ in range(50))
    assert int(arrival_counters(1, x.device).count_nonzero()) == 0


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("rows", [(4096, 1024, 1024), (11008, 11008)])  # Llama-3-8B q/k/v, Llama-2-7B gate/up
def test_gpu_bf16_grouped_projections_match_reference_and_are_deterministic(M, rows):
    from nf4lora.kernels import nf4_linear_parts

    weights = [quantize(torch.randn(n, 4096, device="cuda")) for n in rows]
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    outs = nf4_linear_parts(x, weights)
    for out, q in zip(outs, weights):
        ref = F.linear(x.double(), dequantize_reference(q, torch.bfloat16).double())
        assert out.shape == (M, q.shape[0]) and float((out.double() - ref).norm() / ref.norm()) < 1e-2
    first = torch.cat(outs, dim=1)
    assert all(torch.equal(torch.cat(nf4_linear_parts(x, weights), dim=1), first) for _ in range(20))


@pytest.mark.parametrize("H, H_kv, L", [(32, 32, 256), (32, 8, 2304), (64, 8, 4096)])  # 7B, 8B, 70B-shaped caches
def test_gpu_bf16_decode_attention_matches_sdpa(H, H_kv, L):
    from nf4lora.kernels.decode_attention import decode_attention

    q = torch.randn(2, H, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, H_kv, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.arange(L, device="cuda") < torch.tensor([[L // 3], [L - 5]], device="cuda")  # filled prefixes
    mask = mask[:, None, None, :].contiguous()
    out = decode_attention(q, k, v, mask)
    kr, vr = (t.double().repeat_interleave(H // H_kv, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.double(), kr, vr, attn_mask=mask)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_gpu_split_k_in_cuda_graphs_uses_counters_zeroed_before_capture(monkeypatch):
    from nf4lora.kernels import gemv_nf4

    monkeypatch.setattr(gemv_nf4, "_ARRIVALS", {})
    q = quantize(torch.randn(11008, 4096, device="cuda"))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = nf4_linear(x, q)  # allocates and zeroes the eager and the graphs' counters
    graphs = []
    for _ in range(2):  # the second graph must not depend on the first having replayed
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = nf4_linear(x, q)
        graphs.append((graph, out))
    for graph, out in reversed(graphs):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    monkeypatch.setattr(gemv_nf4, "_ARRIVALS", {})  # no eager launch before this capture: refused, not garbage
    with pytest.raises(RuntimeError, match="outside the capture first"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            nf4_linear(x, q)


def test_gpu_cached_relaunch_matches_fresh_launch_and_respects_alignment():
    # second and later calls skip the JIT through launch.CachedLaunch; a misaligned view of x must not
    # reuse a binary specialized for 16-byte aligned pointers
    q = quantize(torch.randn(512, 1024, device="cuda"))
    base = torch.randn(2 * 1024 + 1, device="cuda", dtype=torch.bfloat16)
    for x in (base[:1024].view(1, 1024), base[1:1025].view(1, 1024), base[:4096 // 4].view(1, 1024)):
        ref = F.linear(x.double(), dequantize_reference(q, torch.bfloat16).double())
        for _ in range(3):
            y = nf4_linear(x, q)
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    outs = [dequantize(q, torch.bfloat16) for _ in range(3)]
    assert all(torch.equal(o, dequantize_reference(q, torch.bfloat16)) for o in outs)


def test_gpu_cached_relaunch_reports_to_launch_hooks_while_one_is_installed():
    # relaunches go straight to the compiled launcher, which skips the metadata Triton builds for launch hooks, so
    # while a hook is installed they must take Triton's own path and the hook must see every launch
    from triton import knobs

    q = quantize(torch.randn(256, 512, device="cuda"))
    dequantize(q, torch.bfloat16)  # compiled and cached
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        out = dequantize(q, torch.bfloat16)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    dequantize(q, torch.bfloat16)
    assert len(seen) == 1 and "dequantize" in seen[0]
    assert torch.equal(out, dequantize_reference(q, torch.bfloat16))
