"""Decode-step attention (one query row per sequence over a static KV cache) on a GPU.

For Llama-shaped heads and cache lengths, in one process on the same random cache: our ``decode_attention``
against ``F.scaled_dot_product_attention`` with the same boolean mask (torch's default backend choice, cuDNN on
an H200) and with the memory-efficient backend; GQA for the peers through ``enable_gqa``. Timed as CUDA-graph
replays over rotating cache copies, so the cache streams from DRAM. Each row's check judges our output against a
float64 reference (relative error <= 1e-2); the run exits 1 if any row fails.

    python benchmarks/decode_attention.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    bench_rotating, copies_for, device_ceilings, environment, judge, peer_ratios, positive_ints, streaming_rate,
    write_results,
)
from nf4lora.kernels.decode_attention import decode_attention  # noqa: E402

# name -> (query heads, kv heads, head_dim)
MODELS = {"Llama-2-7B": (32, 32, 128), "Llama-3-8B": (32, 8, 128), "Llama-3-70B": (64, 8, 128)}
LENGTHS = (256, 1024, 4096)
COLUMNS = ["model", "B", "L", "ours_ms", "sdpa_ms", "sdpa_efficient_ms", "GB/s", "%copy", "vs_sdpa",
           "vs_sdpa_efficient", "check"]


def bench_case(name: str, H: int, H_kv: int, D: int, B: int, L: int, copy_gbs: float) -> dict:
    nbytes = 2 * B * H_kv * L * D * 2
    caches = [tuple(torch.randn(B, H_kv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(copies_for(nbytes))]
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    filled = torch.randint(L // 2, L + 1, (B, 1), device="cuda")  # each row's filled prefix of the static cache
    mask = (torch.arange(L, device="cuda") < filled)[:, None, None, :].contiguous()

    def sdpa(k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != H_kv)

    def sdpa_efficient(k, v):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return sdpa(k, v)

    k, v = caches[0]
    groups = H // H_kv
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(groups, 1),
                                         v.double().repeat_interleave(groups, 1), attn_mask=mask)
    out = decode_attention(q, k, v, mask)
    times = {
        "ours_ms": bench_rotating([lambda c=c: decode_attention(q, *c, mask) for c in caches]),
        "sdpa_ms": bench_rotating([lambda c=c: sdpa(*c) for c in caches]),
    }
    if H == H_kv:  # the memory-efficient kernel has no grouped-query form
        times["sdpa_efficient_ms"] = bench_rotating([lambda c=c: sdpa_efficient(*c) for c in caches])
    row = {"model": name, "B": B, "L": L, **times, **streaming_rate(nbytes, times["ours_ms"], copy_gbs),
           **peer_ratios(times), "check": judge({}, {"rel_err": float((out.double() - ref).norm() / ref.norm())})}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_ints, default="1,8", help="sequences per step")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    env = environment()
    ceilings = device_ceilings()
    rows = [bench_case(name, H, H_kv, D, B, L, ceilings["copy_gbs"])
            for name, (H, H_kv, D) in MODELS.items() for B in args.batch for L in LENGTHS]
    config = {"models": MODELS, "lengths": LENGTHS, "dtype": "bfloat16", "mask": "bool (B, 1, 1, L), filled prefixes"}
    write_results("decode-attention", rows, config, env, ceilings, COLUMNS, out_dir=args.out_dir, announce=True,
                  summary="One query row per sequence over a bf16 static KV cache; GB/s counts the K and V bytes "
                          "read.")
    return 0 if all(row["check"].startswith("ok") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
