import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import assert_same_bytes

from nf4lora.kernels import quantize
from nf4lora.nf4 import codebook
from nf4lora.nf4.tensor import quantize as quantize_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy divides by zero


@pytest.mark.parametrize(
    "shape, blocksize, quant_type, double_quant, dtype",
    [
        ((64, 96), 64, "nf4", True, torch.float32),
        ((33, 7), 32, "fp4", False, torch.float16),  # odd numel: padded tail byte
        ((5, 1001), 64, "nf4", True, torch.bfloat16),  # partial last block
        ((300, 700), 256, "nf4", True, torch.float32),  # nested: a partial block of 256 absmax
        ((3, 4096), 4096, "fp4", True, torch.float16),  # one block per row
        ((129,), 128, "nf4", False, torch.float32),
        ((41, 1000), 64, "nf4", False, torch.float32),  # two tiles per program, the last program's second partial
    ],
)
def test_quantize_matches_reference_bytes(
    triton_mode, poisoned, device, shape, blocksize, quant_type, double_quant, dtype
):
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    ref = quantize_ref(w.to(device), blocksize, quant_type, double_quant)
    q = quantize(w.to(device), blocksize, quant_type, double_quant)
    assert q.device.type == device.type
    assert_same_bytes(q, ref)


def test_quantize_reads_non_contiguous_and_3d_weights(triton_mode, poisoned, device):
    w = torch.randn(96, 64)
    for t in (w.T, w.reshape(4, 24, 64)):  # a transposed view is copied; a contiguous 3-d tensor is read flat
        q = quantize(t.to(device))
        assert q.shape == t.shape
        assert_same_bytes(q, quantize_ref(t.contiguous().to(device)))


def test_weights_sharing_a_codebook_save_to_one_safetensors_file(triton_mode, device, tmp_path):
    from safetensors.torch import load_file, save_file

    from nf4lora.nf4.state_dict import from_bnb_state_dict, to_bnb_state_dict

    qs = [quantize(torch.randn(8, 64).to(device)) for _ in range(2)]
    assert qs[0].state.code.data_ptr() == qs[1].state.code.data_ptr()  # the cached codebook, not a copy each
    entries = {k: v.cpu() for i, q in enumerate(qs) for k, v in to_bnb_state_dict(q, f"w{i}").items()}
    save_file(entries, tmp_path / "two.safetensors")  # refuses tensors that share storage
    loaded = load_file(tmp_path / "two.safetensors")
    for i, q in enumerate(qs):
        assert_same_bytes(from_bnb_state_dict({k: v for k, v in loaded.items() if k.startswith(f"w{i}")}, f"w{i}"), q)


@pytest.mark.parametrize("double_quant", [False, True])  # without double quantization absmax is compared exactly
def test_quantize_all_zero_blocks_match_reference(triton_mode, poisoned, device, double_quant):
    """An all-zero full block stores absmax 0 and an all-zero partial last block the clamped 1e-38, as the
    reference does (at blocksize 64; at 256 every block, the partial last one too, holds nonzero values)."""
    w = torch.randn(10, 64)
    w[2] = 0  # a full zero block at blocksize 64
    w[9, 40:] = 0
    t = torch.cat([w.reshape(-1), torch.zeros(100)])  # 740 elements: the last full block and the partial one zero
    assert torch.equal(quantize_ref(t, 64, double_quant=False).state.absmax[[2, -2, -1]], torch.tensor([0, 0, 1e-38]))
    for blocksize in (64, 256):
        for x in (w, t):
            q = quantize(x.to(device), blocksize, double_quant=double_quant)
            assert_same_bytes(q, quantize_ref(x.to(device), blocksize, double_quant=double_quant))


def test_quantize_ties_take_the_lower_code(triton_mode, device):
    code = codebook.nf4_code()
    bounds, _ = codebook.quantize_bounds(code)
    # each midpoint exactly, scaled by absmax 1 (the block's first element pins absmax to 1)
    w = torch.cat([torch.ones(1), bounds, -bounds]).reshape(1, -1)
    w = torch.nn.functional.pad(w, (0, 64 - w.shape[1]))
    assert_same_bytes(quantize(w.to(device), 64, double_quant=False), quantize_ref(w, 64, double_quant=False))


def test_quantize_custom_codebook_matches_reference(triton_mode, device):
    code = torch.linspace(-1, 1, 16).flip(0)  # unsorted: exercises the order table
    w = torch.randn(4, 96)
    q = quantize(w.to(device), 32, code=code.to(device))
    assert q.state.quant_type == "custom"
    assert_same_bytes(q, quantize_ref(w.to(device), 32, code=code.to(device)))


@pytest.mark.parametrize("double_quant", [True, False])  # checked through the offset, or through absmax
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite_weights(triton_mode, device, bad, double_quant):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="1 NaN or Inf values"):
        quantize(w.to(device), double_quant=double_quant)


def test_quantize_refuses_bad_blocksize_and_codebook(triton_mode, device):
    w = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="blocksize 48 is not supported"):
        quantize(w, 48)
    with pytest.raises(ValueError, match=r"custom codebook must be \(16,\) float32"):
        quantize(w, code=torch.zeros(8))
    with pytest.raises(TypeError, match="cannot quantize weight of dtype torch.int32"):
        quantize(w.int())


def test_quantize_refuses_finite_weights_whose_absmax_mean_overflows(triton_mode, device):
    # every block's absmax near float32's max: their mean, the double quantization's offset, overflows
    w = torch.full((4, 64), 3.0e38).to(device)
    with pytest.raises(ValueError, match=r"double quantization needs mean\(absmax\), which overflows float32"):
        quantize(w, double_quant=True)
    assert bool(torch.isfinite(quantize(w, double_quant=False).dequantize()).all())


def test_quantize_records_a_numpy_blocksize_as_a_python_int(triton_mode, device):
    np = pytest.importorskip("numpy")
    q = quantize(torch.randn(4, 64, device=device), blocksize=np.int64(32))
    assert type(q.state.blocksize) is int and q.state.blocksize == 32


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 150),
    blocksize=st.sampled_from([32, 64, 128]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_quantize_bytes_equal_reference_for_any_shape_and_scale(rows, cols, blocksize, scale, seed):
    from nf4lora.kernels import use_kernels

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * scale
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with use_kernels("triton"):
        q = quantize(w.to(device), blocksize)
    assert_same_bytes(q, quantize_ref(w.to(device), blocksize))


def _scalings_disagree(absmax: float, n: int) -> torch.Tensor:
    """Up to ``n`` values x in (-absmax, absmax) next to NF4's midpoints times absmax for which x * (1 / absmax)
    and x / absmax (float32) fall on different sides of a midpoint, so the two roundings give different codes."""
    bounds, _ = codebook.quantize_bounds(codebook.nf4_code())
    a = torch.tensor(absmax)
    near = ((bounds * a).view(torch.int32)[:, None] + torch.arange(-6, 7, dtype=torch.int32)).view(torch.float32)
    near = near.flatten()
    return near[torch.bucketize(near * (1.0 / a), bounds) != torch.bucketize(near / a, bounds)][:n]


def test_quantize_scales_full_blocks_by_the_reciprocal_and_the_partial_block_by_division(triton_mode, device):
    """Full blocks scale by x * (1 / absmax), the partial last block by x / absmax, as the reference (and
    bitsandbytes) do: each block holds values whose code depends on which of the two roundings is used."""
    blocks = []
    while len(blocks) < 5:  # four full blocks, then a partial last block of 40 elements
        absmax = float(torch.empty(()).uniform_(0.1, 10))
        disagree = _scalings_disagree(absmax, 30)
        if disagree.numel():
            filler = torch.empty((64 if len(blocks) < 4 else 40) - 1 - disagree.numel()).uniform_(-absmax, absmax)
            blocks.append(torch.cat([torch.tensor([absmax]), disagree, filler]))
    w = torch.cat(blocks)
    assert_same_bytes(quantize(w.to(device), 64, double_quant=False), quantize_ref(w, 64, double_quant=False))


def _fma_bin(s: float) -> int:
    """The kernel's bin of a float32 value: the low 5 bits of fma(s, 15, 1.5 * 2^23 + 15), rounded once, half to even."""
    from fractions import Fraction

    return int(round(Fraction(s) * 15 + Fraction(1.5 * 2**23 + 15))) % 32


@pytest.mark.parametrize("code", [codebook.nf4_code(), torch.linspace(-1, 1, 16)], ids=["nf4", "linspace"])
def test_midpoint_bins_count_the_midpoints_below_every_value(code):
    from nf4lora.kernels.quantize_nf4 import midpoint_bins

    bounds, _ = codebook.quantize_bounds(code)
    table = midpoint_bins(bounds)
    below, inside = table[:32].view(torch.int32), table[32:]
    # every midpoint and the edges of every bin (s * 15 = k + 1/2), each with its float32 neighbours, and random values
    edges = torch.tensor([(k + 0.5) / 15 for k in range(-15, 15)] + [-1.0, 1.0, 0.0])
    centres = torch.cat([bounds, edges])
    steps = torch.arange(-3, 4, dtype=torch.int32)
    near = (centres.view(torch.int32)[:, None] + steps).view(torch.float32).flatten()  # (+-0 gives NaNs: dropped)
    values = torch.cat([near[near.isfinite()], torch.empty(2000).uniform_(-1.0001, 1.0001)])
    for s in values.tolist():
        b = _fma_bin(s)
        assert b <= 30
        got = int(below[b]) + int(float(inside[b]) < s)
        assert got == int((bounds < s).sum()), (s, b)


def test_midpoint_bins_leave_crowded_or_wide_codebooks_to_the_search():
    from nf4lora.kernels.quantize_nf4 import midpoint_bins

    assert midpoint_bins(codebook.quantize_bounds(codebook.get_code("fp4"))[0]) is None  # 3 midpoints near 0
    wide = codebook.nf4_code() * 1.5  # a midpoint beyond 1: the search clamps first, the bins would not
    assert midpoint_bins(codebook.quantize_bounds(wide)[0]) is None
