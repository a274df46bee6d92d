import contextlib
from types import SimpleNamespace

import pytest
import torch

from nf4lora.kernels import dispatch, kernel_mode, use_kernels


def test_mode_defaults_to_auto(monkeypatch):
    monkeypatch.delenv("NF4LORA_KERNELS", raising=False)
    assert kernel_mode() == "auto"


@pytest.mark.parametrize("mode", ["auto", "triton", "reference"])
def test_env_var_sets_the_mode(monkeypatch, mode):
    monkeypatch.setenv("NF4LORA_KERNELS", mode.upper())
    assert kernel_mode() == mode


def test_bad_env_var_names_the_valid_modes(monkeypatch):
    monkeypatch.setenv("NF4LORA_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"NF4LORA_KERNELS='fast' is not a kernel mode.*'reference'"):
        kernel_mode()


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("NF4LORA_KERNELS", "triton")
    with use_kernels("reference"):
        assert kernel_mode() == "reference"
        with use_kernels("auto"):
            assert kernel_mode() == "auto"
        assert kernel_mode() == "reference"
    assert kernel_mode() == "triton"


def test_context_manager_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='cuda' is not a kernel mode"):
        with use_kernels("cuda"):
            pass


def test_auto_uses_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("NF4LORA_KERNELS", raising=False)
    assert not dispatch.use_triton(torch.device("cpu"))
    assert dispatch.use_triton(torch.device("cuda")) == dispatch.triton_available()


def test_forced_modes_apply_on_every_device(monkeypatch):
    monkeypatch.setitem(dispatch._PROCESS, "interpret", True)  # CPU tensors take Triton under the interpreter
    with use_kernels("reference"):
        assert not dispatch.use_triton(torch.device("cuda"))
    with use_kernels("triton"):
        assert dispatch.use_triton(torch.device("cpu"))


def test_forced_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with use_kernels("triton"), pytest.raises(ValueError, match="triton package is not installed"):
        dispatch.use_triton(torch.device("cpu"))


def test_host_cdiv_and_next_power_of_2_equal_triton_s():
    import triton

    for a in [0, 1, 2, 3, 15, 16, 17, 1000, 4095, 4096, 4097, 11008 * 4096 + 3]:
        for b in [1, 2, 7, 16, 64, 128, 2048]:
            assert dispatch.cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 300)) + [4095, 4096, 4097, 11008, 32768, 32769]:
        assert dispatch.next_power_of_2(n) == triton.next_power_of_2(n)


def test_tma_only_on_hopper_or_later_and_under_the_interpreter(monkeypatch):
    monkeypatch.setitem(dispatch._PROCESS, "interpret", True)
    assert dispatch.has_tma(torch.device("cpu"))
    monkeypatch.setitem(dispatch._PROCESS, "interpret", False)
    assert not dispatch.has_tma(torch.device("cpu"))
    assert not dispatch.is_hopper(torch.device("cpu"))
    for (major, minor), expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setitem(dispatch._PROPERTIES, 7, SimpleNamespace(major=major, minor=minor))
        assert dispatch.has_tma(torch.device("cuda:7")) is expected
        assert dispatch.is_hopper(torch.device("cuda:7")) is ((major, minor) == (9, 0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on masked-off lanes
@pytest.mark.parametrize(
    "env, block, runs_kernels",
    [("triton", None, True), ("reference", None, False), (None, None, False), ("auto", None, False),
     ("reference", "triton", True), ("triton", "reference", False)],
)
def test_mode_decides_whether_ops_on_cpu_tensors_launch_triton_kernels(
    kernel_launches, monkeypatch, env, block, runs_kernels
):
    """End to end through the public ops on CPU tensors: ``NF4LORA_KERNELS=triton`` (or a ``use_kernels("triton")``
    block over another setting) runs quantize, dequantize and nf4_linear's forward and backward as Triton kernels;
    ``reference``, ``auto`` and an unset variable launch none, and a ``use_kernels`` block wins over the variable."""
    from nf4lora.kernels import dequantize, nf4_linear, quantize

    if env is None:
        monkeypatch.delenv("NF4LORA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("NF4LORA_KERNELS", env)
    x = torch.randn(17, 128, requires_grad=True)
    with use_kernels(block) if block else contextlib.nullcontext():
        q = quantize(torch.randn(8, 128))
        dequantize(q)
        with torch.no_grad():
            nf4_linear(x[:1], q)
        nf4_linear(x, q).sum().backward()
    expected = [
        "_quantize_blockwise_kernel", "_quantize_blockwise_kernel",  # the codes, then the nested absmax
        "_dequantize_tma_kernel",
        "_gemv_kernel",
        "_dequantize_kernel", "_dequantize_kernel",  # 17 rows: dequantize + GEMM, forward and grad_input
    ]
    assert kernel_launches == (expected if runs_kernels else [])
    assert x.grad is not None
