import torch

from nf4lora.kernels.matmul_nf4 import dequant_matmul, release_workspaces, workspace
from nf4lora.nf4.tensor import dequantize as dequantize_ref
from nf4lora.nf4.tensor import quantize as quantize_ref


def test_dequant_matmul_forward_and_transpose_match_reference(device):
    q = quantize_ref(torch.randn(24, 80))
    w = dequantize_ref(q, torch.float32).double()
    x, g = torch.randn(19, 80), torch.randn(19, 24)
    bias = torch.randn(24)
    y = dequant_matmul(x.to(device), q.to(device), bias.to(device))
    gx = dequant_matmul(g.to(device), q.to(device), transpose=False)
    # fp32 GEMM against float64 on the same operands: rounding near 1e-7, so 1e-5
    torch.testing.assert_close(y.cpu().double(), x.double() @ w.T + bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.cpu().double(), g.double() @ w, rtol=1e-5, atol=1e-5)


def test_workspace_is_shared_and_grows(device):
    release_workspaces()
    small = workspace(torch.Size([4, 8]), torch.float16, device)
    again = workspace(torch.Size([2, 16]), torch.float16, device)
    assert again.data_ptr() == small.data_ptr() and again.shape == (2, 16)
    big = workspace(torch.Size([64, 64]), torch.float16, device)
    assert big.shape == (64, 64) and big.is_contiguous()
    # views cut before the buffer grew are cut again from the new one
    assert workspace(torch.Size([4, 8]), torch.float16, device).data_ptr() == big.data_ptr()
    assert workspace(torch.Size([4, 8]), torch.float32, device).dtype == torch.float32
    release_workspaces()
