"""The double quantization's offset read back through the nested pass's store (``quantize_nf4._offset_slot``) in
place of ``offset.item()``: the stored value is the offset bit for bit, the bytes stay the reference's, non-finite
weights are still refused, and threads quantizing at once each read their own offset."""

import threading

import pytest
import torch
from kernel_helpers import assert_same_bytes

from nf4lora.kernels import quantize_nf4
from nf4lora.kernels.quantize_nf4 import quantize_triton
from nf4lora.nf4 import codebook
from nf4lora.nf4.tensor import quantize as quantize_ref

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy divides by zero


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether float32 tensors ``a`` and ``b`` (any device, one element each) hold the same bit pattern."""
    return torch.equal(a.cpu().reshape(1).view(torch.int32), b.cpu().reshape(1).view(torch.int32))


def assert_reference_bytes(q, w: torch.Tensor, blocksize: int) -> None:
    """``q`` holds the bytes and state tensors of the reference's double-quantized ``w`` (on ``w``'s device)."""
    assert_same_bytes(q, quantize_ref(w, blocksize))


def quantize_on_threads(weights: list[torch.Tensor], rounds: int) -> list[tuple[list, int]]:
    """Quantize each of ``weights`` ``rounds`` times on a thread of its own, all threads started together.
    Returns, per weight, its quantized copies and its thread's id; a thread's exception is re-raised here."""
    start = threading.Barrier(len(weights))
    results, errors = [None] * len(weights), []

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = ([quantize_triton(weights[i]) for _ in range(rounds)], threading.get_ident())
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(weights))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def record_offset_reads(monkeypatch, before: threading.Barrier | None) -> dict[int, list[float]]:
    """Record the offsets ``quantize_triton`` reads, as thread id -> values in call order. With ``before``, each
    read waits there first: once every thread is waiting, every thread's nested pass has stored its offset, so a
    slot shared between threads would hand all but one of them another thread's value."""
    reads: dict[int, list[float]] = {}
    read = quantize_nf4._read_offset

    def recorded(slot, device):
        if before is not None:
            before.wait()
        mean = read(slot, device)
        reads.setdefault(threading.get_ident(), []).append(mean)
        return mean

    monkeypatch.setattr(quantize_nf4, "_read_offset", recorded)
    return reads


def assert_threads_read_their_offsets(weights: list[torch.Tensor], results, reads: dict[int, list[float]]) -> None:
    """Each thread's quantized weights hold the reference's bytes, and it read each call's own offset."""
    for w, (qs, thread) in zip(weights, results):
        for q in qs:
            assert_reference_bytes(q, w, 64)
        assert reads[thread] == [q.state.offset.item() for q in qs]


def assert_nested_pass_stores_the_mean(absmax: torch.Tensor) -> None:
    """The nested pass over block absmax (nblocks,) float32 stores ``absmax.mean()`` in the slot, bit for bit."""
    offset = absmax.mean()
    slot = quantize_nf4._offset_slot(absmax.device)
    slot.host.fill_(float("nan"))  # a missed store shows
    tables = quantize_nf4._nested_tables(absmax.device)
    quantize_nf4._launch(absmax, tables, codebook.NESTED_BLOCKSIZE, (offset, slot.host))
    mean = quantize_nf4._read_offset(slot, absmax.device)  # waits for the GPU, before the slot is compared
    assert same_bits(slot.host, offset)
    assert mean == offset.item()


@pytest.mark.parametrize(
    "shape, dtype, blocksize, scale",
    [
        ((64, 96), torch.float32, 64, 1.0),
        ((5, 1001), torch.bfloat16, 64, 0.02),  # partial last block
        ((300, 700), torch.float16, 256, 3.0),  # nested: a partial block of 256 absmax
        ((17, 33), torch.float32, 32, 1e-30),
        ((3, 4096), torch.bfloat16, 4096, 1e4),
    ],
)
def test_nested_pass_stores_the_absmax_mean_bit_for_bit(device, shape, dtype, blocksize, scale):
    w = (torch.randn(shape) * scale).to(dtype).to(device)
    _, absmax = quantize_nf4._launch(w, quantize_nf4._named_tables("nf4", device), blocksize)
    assert_nested_pass_stores_the_mean(absmax)


def test_nested_pass_over_several_programs_stores_the_mean(device):
    # 20000 absmax: three programs of the interpreter's 8192-element tiling, only the first of which stores
    assert_nested_pass_stores_the_mean(torch.rand(20000, device=device) * 3)


@pytest.mark.parametrize("shape, blocksize", [((64, 96), 64), ((5, 1001), 128), ((300, 700), 256)])
def test_quantize_reads_the_offset_from_the_slot(device, shape, blocksize):
    w = torch.randn(shape).to(device)
    q = quantize_triton(w, blocksize)
    assert_reference_bytes(q, w, blocksize)
    assert same_bits(quantize_nf4._offset_slot(device).host, q.state.offset)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_still_refuses_non_finite_weights(device, bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="1 NaN or Inf values"):
        quantize_triton(w.to(device))


def test_quantize_still_refuses_an_overflowing_absmax_mean(device):
    with pytest.raises(ValueError, match=r"double quantization needs mean\(absmax\), which overflows float32"):
        quantize_triton(torch.full((4, 64), 3.0e38, device=device))


def test_threads_quantizing_at_once_read_their_own_offsets(device, monkeypatch):
    # weights of different scales, so that an offset read from another thread's call would show
    weights = [torch.randn(40, 128, device=device) * scale for scale in (1e-3, 1.0, 1e3)]
    # one launch at a time: Triton's interpreter patches triton.language while a kernel runs, for every thread
    lock, launch = threading.Lock(), quantize_nf4._launch_quantize

    def serialized(*args, **meta):
        with lock:
            launch(*args, **meta)

    monkeypatch.setattr(quantize_nf4, "_launch_quantize", serialized)
    reads = record_offset_reads(monkeypatch, threading.Barrier(len(weights), timeout=60))
    assert_threads_read_their_offsets(weights, quantize_on_threads(weights, rounds=2), reads)


@pytest.mark.gpu
def test_gpu_readback_bytes_refusal_and_threads(monkeypatch):
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    q = quantize_triton(w)
    assert quantize_nf4._offset_slot(w.device).host.is_pinned()
    assert_reference_bytes(q, w, 64)
    assert same_bits(quantize_nf4._offset_slot(w.device).host, q.state.offset)
    w[100, 7] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or Inf values"):
        quantize_triton(w)
    weights = [torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) * scale for scale in (1e-3, 1.0)]
    reads = record_offset_reads(monkeypatch, before=None)
    assert_threads_read_their_offsets(weights, quantize_on_threads(weights, rounds=20), reads)


@pytest.mark.gpu
def test_gpu_readback_on_a_side_stream_waits_for_that_stream():
    """The read waits for the kernels, queued on a busy side stream."""
    side = torch.cuda.Stream()
    w = (torch.randn(4096, 4096, device="cuda") * 3.0).to(torch.bfloat16)
    quantize_triton(w / 7)  # a first launch compiles and tunes, which waits for the GPU; the timed one must not
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keeps the side stream busy, so a read that did not wait would miss
        q = quantize_triton(w)
        assert quantize_nf4._offset_slot(w.device).view.item(0) == q.state.offset.item()
    torch.cuda.current_stream().wait_stream(side)
    assert_reference_bytes(q, w, 64)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_readback_on_a_second_gpu_uses_that_gpus_slot():
    w0 = torch.randn(1024, 4096, device="cuda:0") * 1e-3
    w1 = torch.randn(1024, 4096, device="cuda:1") * 1e3
    q1, q0 = quantize_triton(w1), quantize_triton(w0)
    slot_0, slot_1 = quantize_nf4._offset_slot(w0.device), quantize_nf4._offset_slot(w1.device)
    assert same_bits(slot_0.host, q0.state.offset) and same_bits(slot_1.host, q1.state.offset)
    with torch.cuda.device(1):
        assert_reference_bytes(q1, w1, 64)
    assert_reference_bytes(q0, w0, 64)
