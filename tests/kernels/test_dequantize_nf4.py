import pytest
import torch
from kernel_helpers import OUTPUT_DTYPES, skip_interpreter_bf16

from nf4lora.kernels import dequantize
from nf4lora.kernels.dequantize_nf4 import dequantize_into, tma_store_fits
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref



@pytest.mark.parametrize(
    "shape, blocksize, quant_type, double_quant",
    [
        ((64, 96), 64, "nf4", True),
        ((33, 7), 32, "fp4", False),  # odd numel: the last byte holds one element
        ((5, 1001), 64, "nf4", False),  # partial last block
        ((300, 700), 256, "fp4", True),
        ((3, 4096), 4096, "nf4", True),
        ((48, 200), 32, "nf4", True),  # TMA stores: 300 blocks in boxes of 128, the last one clipped
        ((40, 384), 128, "fp4", False),  # TMA stores: 120 blocks in boxes of 32
    ],
)
@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_dequantize_equals_reference_exactly(
    triton_mode, poisoned, device, shape, blocksize, quant_type, double_quant, dtype
):
    skip_interpreter_bf16(device, dtype)
    q = quantize_ref(torch.randn(shape), blocksize, quant_type, double_quant)
    out = dequantize(q.to(device), dtype)
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == device.type
    assert torch.equal(out.cpu(), dequantize_ref(q, dtype))


def test_dequantize_defaults_to_the_original_dtype(triton_mode, device):
    q = quantize_ref(torch.randn(8, 64, dtype=torch.float16))
    assert dequantize(q.to(device)).dtype == torch.float16


def test_dequantize_any_16_value_codebook(triton_mode, device):
    code = torch.rand(16) * 2 - 1  # unsorted, not NF4 or FP4
    q = quantize_ref(torch.randn(6, 64), 32, code=code)
    assert torch.equal(dequantize(q.to(device), torch.float32).cpu(), dequantize_ref(q, torch.float32))


def test_dequantize_into_writes_the_given_buffer(triton_mode, device):
    q = quantize_ref(torch.randn(16, 64)).to(device)
    out = torch.full((16, 64), float("nan"), device=device)
    assert dequantize_into(q, out) is out
    assert torch.equal(out.cpu(), dequantize_ref(q.to("cpu"), torch.float32))


def test_dequantize_tma_and_plain_stores_write_the_same_values(triton_mode, device):
    q = quantize_ref(torch.randn(96, 160), 64).to(device)
    ref = dequantize_ref(q.to("cpu"), torch.float16)
    out = torch.full((96, 160), float("nan"), dtype=torch.float16, device=device)
    assert tma_store_fits(64, q.numel(), out) == (device.type == "cpu" or torch.cuda.get_device_capability() >= (9, 0))
    assert torch.equal(dequantize_into(q, out).cpu(), ref)
    out.fill_(float("nan"))
    assert torch.equal(dequantize_into(q, out, bulk_store=False).cpu(), ref)


def test_dequantize_takes_plain_stores_where_tma_cannot_write(triton_mode, device):
    q = quantize_ref(torch.randn(8, 512), 64).to(device)
    buffer = torch.full((q.numel() + 1,), float("nan"), device=device)
    misaligned = buffer[1:]  # 4 bytes past a 16-byte boundary
    assert not tma_store_fits(64, q.numel(), misaligned)
    assert not tma_store_fits(64, q.numel() - 32, buffer)  # a partial last block
    assert not tma_store_fits(512, q.numel(), buffer)  # blocks wider than a TMA box
    assert torch.equal(dequantize_into(q, misaligned).cpu().view(8, 512), dequantize_ref(q.to("cpu"), torch.float32))


def test_dequantize_refuses_bad_outputs(triton_mode, device):
    q = quantize_ref(torch.randn(4, 64)).to(device)
    with pytest.raises(TypeError, match="cannot dequantize to torch.int32"):
        dequantize_into(q, torch.empty(4, 64, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out must be contiguous with 256 elements, got 255"):
        dequantize_into(q, torch.empty(255, device=device))


def test_dequantize_refuses_state_on_another_device(triton_mode, device):
    q = quantize_ref(torch.randn(4, 64)).to(device)
    q.state.code = q.state.code.to("meta")
    with pytest.raises(ValueError, match=f"state.code is on meta but packed is on {device.type}"):
        dequantize(q)


_ALLOCATIONS_AND_VIEWS = ("aten.empty", "aten.view", "aten.detach", "aten.alias", "aten.as_strided")


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("bulk_store", [True, False])
def test_dequantize_is_one_kernel_launch(kernel_launches, triton_mode, quant_type, double_quant, bulk_store):
    """Dequantization, double-quantized absmax included, is one Triton launch: before and after it the host only
    allocates the output and views the packed bytes as words; no torch op decodes the absmax or touches the values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    host_ops = []

    class HostOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not kernel_launches.running:
                host_ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q = quantize_ref(torch.randn(48, 200), 32, quant_type, double_quant)
    with HostOps():
        out = dequantize(q, torch.float16, bulk_store)
    assert kernel_launches == ["_dequantize_tma_kernel" if bulk_store else "_dequantize_kernel"]
    assert host_ops and all(op.startswith(_ALLOCATIONS_AND_VIEWS) for op in host_ops), host_ops
    assert torch.equal(out, dequantize_ref(q, torch.float16))
