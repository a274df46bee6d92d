"""Split-K chunk sweep for the fused small-M kernels (``gemv_nf4.fused_matmul``) on a GPU.

For each weight shape and M, times the fused matmul with every K chunk (columns per program) in
``--chunks`` against the chunk ``split_k_chunk`` picks, on the same random weights (rotating copies so
that the weights stream from DRAM). This is the sweep behind ``GEMV_CHUNK_ALIGNS`` / ``TILE_CHUNK_ALIGNS``.

    python benchmarks/split_k.py [--shapes 4096x4096,...] [--ms 1,2,16] [--chunks 1024,2048,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    bench_rotating, copies_for, environment, positive_ints, shape_list, write_results,
)
from benchmarks.kernels import SHAPES  # noqa: E402
from nf4lora.kernels import gemv_nf4, quantize  # noqa: E402


def sweep(shapes, ms, chunks) -> list[dict]:
    rows = []
    for n, k in shapes:
        weights = [quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
                   for _ in range(min(copies_for(n * k // 2), 16))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": f"{n}x{k}", "M": m,
                   "picked_chunk": gemv_nf4.split_k_chunk(m, n, k, gemv_nf4.default_block_m(m), x.device)}
            for chunk in (c for c in chunks if c <= k):
                with mock.patch.object(gemv_nf4, "split_k_chunk", lambda *args, c=chunk: c):
                    us = 1e3 * bench_rotating([lambda q=q: gemv_nf4.fused_matmul(x, q) for q in weights])
                row[f"c{chunk}_us"] = round(us, 1)
            timed = {c: row[f"c{c}_us"] for c in chunks if c <= k}
            row["best_chunk"] = min(timed, key=timed.get)
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_list, default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="NxK,NxK,...")
    parser.add_argument("--ms", type=positive_ints, default="1,2,16", help="rows of x")
    parser.add_argument("--chunks", type=positive_ints, default="1024,2048,3072,4096,8192",
                        help="K columns per program")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    shapes, ms, chunks = args.shapes, args.ms, args.chunks
    unsplittable = [f"{n}x{k}" for n, k in shapes if not any(c <= k for c in chunks)]
    if unsplittable:
        parser.error(f"no --chunks value is <= K for {', '.join(unsplittable)}; valid: chunks up to each shape's K")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/split_k.py needs a CUDA GPU")
    rows = sweep(shapes, ms, chunks)
    columns = ["shape", "M", "picked_chunk", *(f"c{c}_us" for c in chunks), "best_chunk"]
    write_results("split-k", rows, {"shapes": shapes, "ms": ms, "chunks": chunks}, environment(), {}, columns,
                  summary="Fused small-M matmul, bf16, microseconds per call for each K chunk (columns per program).",
                  out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
