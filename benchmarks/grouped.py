"""Decode projections that read the same x (q/k/v, gate/up) in one launch, on a GPU.

For each group of weights and M = 1, 2, in one process on the same random weights (rotating copies, so
they stream from DRAM; timed as CUDA-graph replays): our one-launch ``nf4_linear_parts``, our separate
``nf4_linear`` calls, bitsandbytes' separate ``matmul_4bit`` calls, bf16 ``F.linear`` per weight, and bf16
``F.linear`` on the weights concatenated once (the fused-QKV layout a bf16 model can use).

    PYTHONPATH=.bnb:. python benchmarks/grouped.py [--ms 1,2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    bench_rotating, copies_for, device_ceilings, environment, judge, peer_ratios, positive_ints, rel_err,
    streaming_rate, write_results,
)
from nf4lora.kernels import nf4_linear, nf4_linear_parts, quantize  # noqa: E402
from nf4lora.kernels.reference import dequantize_reference  # noqa: E402

# name -> (K, rows of each weight)
GROUPS = {
    "Llama-2-7B q/k/v": (4096, (4096, 4096, 4096)),
    "Llama-3-8B q/k/v": (4096, (4096, 1024, 1024)),
    "Llama-2-7B gate/up": (4096, (11008, 11008)),
    "Llama-3-70B q/k/v": (8192, (8192, 1024, 1024)),
    "Llama-3-70B gate/up": (8192, (28672, 28672)),
}
COLUMNS = ["group", "M", "ours_ms", "separate_ms", "bnb_ms", "bf16_ms", "bf16_fused_ms", "GB/s", "%copy",
           "vs_separate", "vs_bnb", "vs_bf16", "vs_bf16_fused", "check"]


def bench_group(name: str, K: int, rows: tuple[int, ...], ms: tuple[int, ...], bnb, copy_gbs: float) -> list[dict]:
    dense = [torch.randn(n, K, device="cuda", dtype=torch.bfloat16) * 0.02 for n in rows]
    # Each peer's weights rotate over their own ROTATION_BYTES: sized on the packed and bf16 bytes together, the
    # packed copies spanned only 65-90 MB, which the GEMV reads partly from L2.
    packed_copies = copies_for(sum(n * K // 2 for n in rows))
    ours = [[quantize(w) for w in dense] for _ in range(packed_copies)]
    theirs = [[bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
               for w in dense] for _ in range(packed_copies)]
    dense_copies = copies_for(2 * sum(w.numel() for w in dense))
    dense_sets = [dense] + [[w.clone() for w in dense] for _ in range(dense_copies - 1)]
    fused_dense = [torch.cat(ws) for ws in dense_sets]
    q_bytes = sum(q.nbytes for q in ours[0])
    results = []
    with torch.no_grad():
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = torch.cat([x.float() @ dequantize_reference(q, torch.bfloat16).float().T for q in ours[0]], dim=1)
            out = torch.cat(nf4_linear_parts(x, ours[0]), dim=1)
            times = {
                "ours_ms": bench_rotating([lambda qs=qs: nf4_linear_parts(x, qs) for qs in ours]),
                "separate_ms": bench_rotating([lambda qs=qs: [nf4_linear(x, q) for q in qs] for qs in ours]),
                "bnb_ms": bench_rotating([lambda bs=bs: [bnb.matmul_4bit(x, b.t(), quant_state=s) for b, s in bs]
                                          for bs in theirs]),
                "bf16_ms": bench_rotating([lambda ws=ws: [F.linear(x, w) for w in ws] for ws in dense_sets]),
                "bf16_fused_ms": bench_rotating([lambda w=w: F.linear(x, w) for w in fused_dense]),
            }
            nbytes = q_bytes + (M * K + M * sum(rows)) * 2
            row = {"group": name, "M": M, **times, **streaming_rate(nbytes, times["ours_ms"], copy_gbs),
                   **peer_ratios(times), "check": judge({}, {"rel_err": rel_err(out, ref)})}
            print(row, flush=True)
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=positive_ints, default="1,2", help="rows of x (1 or 2)")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/grouped.py needs a CUDA GPU")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    ms = args.ms
    env = environment(extra_packages=("bitsandbytes",))
    ceilings = device_ceilings()
    rows: list[dict] = []
    for name, (K, weight_rows) in GROUPS.items():
        rows += bench_group(name, K, weight_rows, ms, bnb, ceilings["copy_gbs"])
        torch.cuda.empty_cache()
    config = {"groups": {name: {"K": K, "rows": r} for name, (K, r) in GROUPS.items()}, "ms": ms, "blocksize": 64,
              "quant_type": "nf4", "double_quant": True, "dtype": "bfloat16"}
    write_results("grouped", rows, config, env, ceilings, COLUMNS, out_dir=args.out_dir, announce=True,
                  summary="Projections that read one x, per decode step: one launch (ours) against one launch per "
                          "weight (ours, bitsandbytes, bf16) and bf16 on the concatenated weight.")
    return 0 if all(row["check"].startswith("ok") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
