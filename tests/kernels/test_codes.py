"""The byte-permute code lookup of ``codes.word_codes``: its inline PTX run by a small emulator of the five
instructions it uses (CI has no GPU), and its tables as ``code_tables`` builds them (interpreter or GPU)."""

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from nf4lora.kernels.codes import _WORD_CODES_PTX, code_tables


def prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX ``prmt.b32`` in its default mode: byte i of the result is byte (c >> 4i) & 7 of {b, a}, or that
    byte's sign replicated when bit 3 of the selector is set (uint32 arrays)."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        selector = (c >> (4 * i)) & 0xF
        byte = np.choose(selector & 7, source)
        byte = np.where(selector & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint32) << (8 * i)
    return out


def run_ptx(text: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the straight-line PTX of an inline asm block on uint32 arrays; returns every $ output (16-bit ones
    from ``mov.b32 {$i, $j}``)."""
    regs = dict(inputs)

    def value(operand: str) -> np.ndarray:
        operand = operand.strip()
        if operand in regs:
            return regs[operand]
        return np.full_like(inputs["$8"], int(operand, 0))

    for line in text.strip().strip("{}").strip().splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32":
            low, high, src = re.fullmatch(r"\{(\$\d+), (\$\d+)\}, (\w+)", args).groups()
            regs[low], regs[high] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        dst, *srcs = [part.strip() for part in args.split(",")]
        a = value(srcs[0])
        if op == "and.b32":
            regs[dst] = a & value(srcs[1])
        elif op == "or.b32":
            regs[dst] = a | value(srcs[1])
        elif op == "shr.u32":
            regs[dst] = a >> value(srcs[1])
        elif op == "prmt.b32":
            regs[dst] = prmt(a, value(srcs[1]), value(srcs[2]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return regs


def tables_for(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """What ``code_tables`` builds: low bytes of codes 4t..4t+3 in table t, then the high bytes."""
    bits = code.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    pack = lambda b: [int(sum(int(b[4 * t + i]) << (8 * i) for i in range(4))) for t in range(4)]  # noqa: E731
    return pack(bits & 0xFF) + pack(bits >> 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_word_codes_ptx_returns_every_element_of_every_word(dtype):
    code = torch.rand(16) * 2 - 1  # any 16 values, signs and all
    words = np.random.default_rng().integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    tables = tables_for(code, dtype)
    inputs = {"$8": words, **{f"${9 + t}": np.full_like(words, table) for t, table in enumerate(tables)}}
    out = run_ptx(_WORD_CODES_PTX.value, inputs)
    code_bits = code.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    for j in range(8):  # element j of a word is the nibble at bit 8 (j // 2) + 4 (1 - j % 2)
        nibble = (words >> (8 * (j // 2) + 4 * (1 - j % 2))) & 15
        assert np.array_equal(out[f"${j}"], code_bits[nibble]), f"element {j}"


@triton.jit
def _tables_kernel(code_ptr, out_ptr, DTYPE: tl.constexpr):
    l0, l1, l2, l3, h0, h1, h2, h3 = code_tables(code_ptr, DTYPE)
    tl.store(out_ptr + 0, l0)
    tl.store(out_ptr + 1, l1)
    tl.store(out_ptr + 2, l2)
    tl.store(out_ptr + 3, l3)
    tl.store(out_ptr + 4, h0)
    tl.store(out_ptr + 5, h1)
    tl.store(out_ptr + 6, h2)
    tl.store(out_ptr + 7, h3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_code_tables_pack_each_codes_bytes(device, dtype):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the interpreter truncates float32 -> bf16 where a GPU rounds to nearest")
    code = torch.rand(16) * 2 - 1
    out = torch.zeros(8, dtype=torch.int32, device=device)
    _tables_kernel[(1,)](code.to(device), out, DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16)
    assert [t & 0xFFFFFFFF for t in out.tolist()] == tables_for(code, dtype)
