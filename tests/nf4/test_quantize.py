"""Bit-exactness with bitsandbytes' CPU quantize_4bit / dequantize_4bit / quantize_blockwise."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nf4lora.nf4 import BLOCKSIZES, blockwise, dequantize, quantize
from nf4lora.nf4.blockwise import dequantize_blockwise, quantize_blockwise
from nf4lora.nf4.codebook import dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# shapes: odd element counts, a row length that is not a multiple of any blocksize, a partial last block, 1-D
SHAPES = [(1,), (7,), (33, 65), (3, 4096 + 40), (130, 96), (3, 4099)]


def _random_weight(shape, dtype, generator):
    w = torch.randn(shape, generator=generator) * torch.rand((), generator=generator).mul(4).add(0.01)
    flat = w.view(-1)
    if flat.numel() > 300:
        flat[:128] = 0.0  # an all-zero block (see blockwise.py on why its codes are the CPU path's)
        flat[200] = 1e-30  # a block dominated by a tiny value
    return w.to(dtype)


def _bnb_reference_dequantize(bnb_functional, packed, state):
    # bitsandbytes' C++ CPU dequantizer indexes absmax per row and is wrong when a row is not a whole number of
    # blocks (its own CUDA and pure-PyTorch paths agree with each other there), so compare with the latter:
    # bitsandbytes' default-backend implementation, unwrapped from its torch.compile decorator.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(packed.view(-1), absmax.float(), state.code, state.blocksize, state.shape, state.dtype)


@pytest.fixture(params=["one step", "4096-element steps"])
def quantize_step(request, monkeypatch):
    """`quantize` at its own step size, or in steps of 4096 elements, so that the larger SHAPES span several steps
    (the odd (3, 4099) one with a partial block and a padded nibble in its last)."""
    assert blockwise.QUANTIZE_STEP % max(BLOCKSIZES) == 0  # steps hold whole blocks of every blocksize
    if request.param != "one step":
        monkeypatch.setattr(blockwise, "QUANTIZE_STEP", 4096)


@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(["nf4", "fp4"], [False, True])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_bitsandbytes_bytes_absmax_and_values(
    bnb_functional, quantize_step, quant_type, double_quant, dtype
):
    generator = torch.Generator().manual_seed(hash((quant_type, double_quant, str(dtype))) % 2**31)
    for blocksize, shape in itertools.product(BLOCKSIZES, SHAPES):
        w = _random_weight(shape, dtype, generator)
        packed, state = bnb_functional.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        ours = quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        where = f"{quant_type} dq={double_quant} {dtype} blocksize={blocksize} shape={shape}"
        assert torch.equal(ours.packed, packed.view(-1)), where
        assert ours.packed.numel() == -(-w.numel() // 2)
        assert torch.equal(ours.state.absmax, state.absmax), where
        assert torch.equal(ours.state.code, state.code)
        if double_quant:
            assert torch.equal(ours.state.offset, state.offset), where
            assert torch.equal(ours.state.nested_absmax, state.state2.absmax), where
            assert torch.equal(ours.state.nested_code, state.state2.code)
            assert ours.state.nested_blocksize == state.state2.blocksize == 256
        expected = _bnb_reference_dequantize(bnb_functional, packed, state)
        got = dequantize(ours)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, expected), where


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_bitsandbytes_cpu_kernel_on_whole_block_rows(bnb_functional, dtype):
    # where every row is a whole number of blocks, bitsandbytes' C++ CPU dequantizer is right: equal to it too
    generator = torch.Generator().manual_seed(7)
    for quant_type, double_quant, blocksize in itertools.product(["nf4", "fp4"], [False, True], [64, 256]):
        w = _random_weight((48, 512), dtype, generator)
        packed, state = bnb_functional.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        ours = quantize(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        assert torch.equal(dequantize(ours), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_blockwise_matches_bitsandbytes_quantize_blockwise(bnb_functional, signed, dtype):
    code = dynamic_map(signed)
    generator = torch.Generator().manual_seed(11 + signed)
    for n, blocksize in itertools.product([1, 255, 4097, 70001], [64, 256, 2048]):
        x = (torch.randn(n, generator=generator) * 3).to(dtype)
        if not signed:
            x = x.abs()
        if n > 300:
            x[:blocksize] = 0
        q, state = bnb_functional.quantize_blockwise(x, code=code.clone(), blocksize=blocksize)
        ours_q, ours_absmax = quantize_blockwise(x, code, blocksize)
        assert torch.equal(ours_q, q.view(-1)), (signed, dtype, n, blocksize)
        assert torch.equal(ours_absmax, state.absmax)
        for out_dtype in DTYPES:
            theirs = torch.ops.bitsandbytes.dequantize_blockwise(q, state.absmax, code, blocksize, out_dtype)
            ours = dequantize_blockwise(ours_q, ours_absmax, code, blocksize, out_dtype)
            assert torch.equal(ours, theirs.view(-1))


def test_bits_per_param_at_blocksize_64():
    w = torch.randn(4096, 4096)
    plain = quantize(w, blocksize=64, double_quant=False)
    nested = quantize(w, blocksize=64, double_quant=True)
    assert plain.bits_per_param == pytest.approx(4.5, abs=1e-3)
    # 4 + 8/64 + 32/(64*256) = 4.127, plus the two codebooks (1088 bytes) spread over 16M weights
    assert nested.bits_per_param == pytest.approx(4.127, abs=1e-3)


def test_to_device_keeps_values_and_repr_names_the_format():
    q = quantize(torch.randn(64, 64))
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize())
    assert "nf4+dq" in repr(q) and "blocksize=64" in repr(q)


class _Allocations(TorchDispatchMode):
    """{storage data pointer: bytes} of every tensor an op returns while active (views map to their base's)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_holds_only_a_step_of_temporaries(monkeypatch, double_quant):
    """Beyond its result, `quantize` allocates no tensor of more than 8 bytes per element of a step, or per absmax
    value (double quantization works on the absmax, 1/64 of the weight), however large the weight: loading a
    checkpoint quantizes in about the memory of the quantized model."""
    monkeypatch.setattr(blockwise, "QUANTIZE_STEP", 4096)
    quantize(torch.randn(256), blocksize=64, double_quant=double_quant)  # codebooks and bin tables are cached once
    w = torch.randn(70, 4096 + 64, dtype=torch.bfloat16)  # 71 steps, about 290 000 elements
    with _Allocations() as allocations:
        q = quantize(w, blocksize=64, double_quant=double_quant)
    allocations.storages.pop(w.untyped_storage().data_ptr(), None)  # views of the input
    result = {t.untyped_storage().data_ptr() for t in (q.packed, q.state.absmax)}
    limit = 8 * max(4096, -(-w.numel() // 64 // 256) * 256)  # absmax padded to whole blocks of 256
    large = {ptr: n for ptr, n in allocations.storages.items() if n > limit and ptr not in result}
    assert not large, f"temporaries of {sorted(large.values())} bytes, more than {limit}"
