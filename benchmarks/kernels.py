"""Benchmark the NF4 Triton kernels against bitsandbytes and bf16 cuBLAS on one GPU.

    PYTHONPATH=.bnb:. python benchmarks/kernels.py [--shapes 4096x4096,...] [--ops linear,...] [--ms 1,2]
        [--out-dir DIR] [--backward-thread autograd|calling]

For each weight shape (N, K) -- Llama-2-7B and Llama-3-70B projections by default -- one random
bf16 weight is quantized (NF4, blocksize 64, double quantization) and every peer uses it:
ours (``nf4lora.kernels``), bitsandbytes (``bnb.functional`` / ``bnb.matmul_4bit``) and bf16
``F.linear``. Each op is checked against a reference before it is timed. Ops:

- quantize (bf16 -> packed + double-quantized state), dequantize (-> bf16),
- M = 1 GEMV and M = 2, 4, 8, 16 (inference, no grad),
- M = 4096 forward + backward (grad to x only; the frozen weight gets none), plus the forward of
  the two large-M candidates: dequantize + cuBLAS vs the fused Triton dequant-matmul. Backward runs on
  autograd's worker thread (torch's default) or, with ``--backward-thread calling``, on the calling thread for
  every peer, as nf4lora's trainer runs it; results then go to ``<date>_kernels-calling-thread_<gpu>``.

``alt_ms`` is the path not taken: dequantize + cuBLAS for M <= 16, the fused kernel for M = 4096.
Reported per row: median ms, effective GB/s (packed + absmax + input + output bytes), % of the
measured copy bandwidth, TFLOP/s, speed ratios to each peer (> 1 means ours is faster), and the check:
"ok" or "FAIL" (``judge``), then the compared values; the run exits 1 if any row fails.
Small ops are timed as CUDA-graph replays over enough weight copies to exceed the L2 cache. Quantize, whose
call waits for the GPU once (to read the offset) and cannot be graphed, is timed in QUANTIZE_ROUNDS alternating rounds,
and M = 4096 forward + backward, whose GEMMs' clocks drift, in LARGE_ROUNDS (``rounds_ms`` in the JSON); their rows
give each side's median.
Prints a table, then one JSON line; writes benchmarks/results/<date>_kernels_<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_backward_thread_option,
    alternating_rounds,
    judge,
    bench,
    bench_rotating,
    copies_for,
    device_ceilings,
    environment,
    markdown_table,
    positive_ints,
    rel_err,
    set_backward_thread,
    shape_list,
    streaming_rate,
    write_results,
)
from nf4lora.kernels import dequantize, nf4_linear, quantize  # noqa: E402
from nf4lora.kernels.gemv_nf4 import fused_matmul  # noqa: E402
from nf4lora.kernels.matmul_nf4 import dequant_matmul  # noqa: E402
from nf4lora.kernels.reference import dequantize_reference, quantize_reference  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672))
SMALL_MS = (1, 2, 3, 4, 8, 16)
OPS = ("quantize", "dequantize", "linear", "large")
LARGE_M = 4096
# quantize (ours, bitsandbytes) and M = 4096 forward + backward (ours, bitsandbytes, bf16) are timed in this many
# alternating rounds
QUANTIZE_ROUNDS = 3
LARGE_ROUNDS = 5
COLUMNS = (
    "op", "shape", "M", "ours_ms", "bnb_ms", "bf16_ms", "alt_ms", "GB/s", "%copy", "TFLOP/s",
    "vs_bnb", "vs_bf16", "check",
)


def rounded(rounds: list[list[float]]) -> list[list[float]]:
    return [[round(t, 4) for t in times] for times in rounds]


def q_bytes(q) -> int:
    """Packed codes + absmax + nested state: what a kernel reading the weight must move."""
    return q.nbytes


def bench_shape(N: int, K: int, bnb, ceilings: dict, ops: set[str], small_ms: tuple[int, ...]) -> list[dict]:
    rows = []
    copy_gbs = ceilings["copy_gbs"]
    shape = f"{N}x{K}"
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02

    q = quantize(w)
    bq, bstate = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    # each peer rotates over about ROTATION_BYTES of its own inputs, as the bf16 weight copies below do: counting
    # the bf16 weight's bytes here too left the packed copies at 27-70 MB, where the tile kernel ran 5-12% slower
    # than over 107-279 MB (results/2026-11-28_tile-configs_h200.md)
    n_copies = copies_for(q_bytes(q))
    qs = [q] + [quantize(w) for _ in range(n_copies - 1)]
    bqs = [(bq, bstate)] + [
        bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        for _ in range(n_copies - 1)
    ]
    out = dequantize(q, torch.bfloat16)

    # ---- quantize -------------------------------------------------------------------
    ref = quantize_reference(w)
    # bitsandbytes' CUDA double quantization rounds some 8-bit absmax codes differently from its CPU path, which
    # the reference follows (nf4/blockwise.py), so its dequantized weights differ too: reported, not judged
    check = judge({
        "bytes==reference": torch.equal(q.packed, ref.packed) and torch.equal(q.state.absmax, ref.state.absmax)
        and torch.equal(q.state.nested_absmax, ref.state.nested_absmax),
    }, {}, {
        "packed==bnb": torch.equal(q.packed, bq.reshape(-1)), "absmax==bnb": torch.equal(q.state.absmax, bstate.absmax),
    })
    if "quantize" in ops:
        # bound by host time at the 7B shapes, which drifts (the first op timed in a process ran 1.4x slower for both
        # peers on two freshly started machines): alternating rounds, each side's median
        rounds = alternating_rounds([
            lambda: quantize(w),
            lambda: bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
        ], QUANTIZE_ROUNDS)
        ours, theirs = (statistics.median(side) for side in zip(*rounds))
        nbytes = w.numel() * 2 + q_bytes(q)
        rows.append(dict(op="quantize", shape=shape, M=None, ours_ms=ours, bnb_ms=theirs, **{
            **streaming_rate(nbytes, ours, copy_gbs), "vs_bnb": theirs / ours,
            "check": check, "rounds_ms": rounded(rounds),
        }))

    # ---- dequantize -----------------------------------------------------------------
    check = judge({"exact==reference": torch.equal(out, dequantize_reference(q, torch.bfloat16))}, {},
                  {"exact==bnb": torch.equal(out, bnb.functional.dequantize_4bit(bq, bstate))})
    if "dequantize" in ops:
        ours = bench_rotating([lambda qi=qi: dequantize(qi, torch.bfloat16) for qi in qs])
        theirs = bench_rotating([lambda b=b: bnb.functional.dequantize_4bit(*b) for b in bqs])
        nbytes = q_bytes(q) + w.numel() * 2
        rows.append(dict(op="dequantize", shape=shape, M=None, ours_ms=ours, bnb_ms=theirs, **{
            **streaming_rate(nbytes, ours, copy_gbs), "vs_bnb": theirs / ours,
            "check": check,
        }))

    # ---- small M (inference) --------------------------------------------------------
    w_copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
    w_deq = out.float()
    with torch.no_grad():
        for M in small_ms if "linear" in ops else ():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = nf4_linear(x, q)
            y_bnb = bnb.matmul_4bit(x, bq.t(), quant_state=bstate)
            y_ref = x.float() @ w_deq.T
            check = judge({}, {"rel_err": rel_err(y, y_ref)}, {"bnb_rel_err": rel_err(y_bnb, y_ref)})
            ours = bench_rotating([lambda qi=qi: nf4_linear(x, qi) for qi in qs])
            theirs = bench_rotating([lambda b=b: bnb.matmul_4bit(x, b[0].t(), quant_state=b[1]) for b in bqs])
            dense = bench_rotating([lambda wi=wi: F.linear(x, wi) for wi in w_copies])
            alt = bench_rotating([lambda qi=qi: dequant_matmul(x, qi) for qi in qs])
            nbytes = q_bytes(q) + (M * K + M * N) * 2
            rows.append(dict(op="linear", shape=shape, M=M, ours_ms=ours, bnb_ms=theirs, bf16_ms=dense, alt_ms=alt, **{
                **streaming_rate(nbytes, ours, copy_gbs),
                "TFLOP/s": 2 * M * N * K / ours / 1e9, "vs_bnb": theirs / ours, "vs_bf16": dense / ours,
                "check": check,
            }))

    # ---- large M: forward + backward (grad to x) ------------------------------------
    if "large" not in ops:
        return rows
    x = torch.randn(LARGE_M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(LARGE_M, N, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(x), x, g)

    ours_f = lambda xx: nf4_linear(xx, q)  # noqa: E731
    bnb_f = lambda xx: bnb.matmul_4bit(xx, bq.t(), quant_state=bstate)  # noqa: E731
    dense_f = lambda xx: F.linear(xx, w)  # noqa: E731
    y = ours_f(x)
    (gx,) = torch.autograd.grad(y, x, g)
    with torch.no_grad():
        y_ref = x.float() @ w_deq.T
        check = judge({}, {"rel_err": rel_err(y, y_ref), "grad_rel_err": rel_err(gx, g.float() @ w_deq)})
        check_fwd = judge({}, {"rel_err": rel_err(dequant_matmul(x, q), y_ref),
                               "fused_rel_err": rel_err(fused_matmul(x, q, block_m=128), y_ref)})
    bench(fwd_bwd(dense_f))  # untimed: brings the clocks up before the first large-M timing
    # The GEMMs' clocks drift by up to 16% within seconds (power and heat): one cuBLAS call's median moved from 2.58
    # to 2.99 ms over three back-to-back timings (results/2026-11-30_gemm-layout-probe_h200.md), a spread wider
    # than the 5% target. So the peers alternate, and each side's median over the rounds is reported.
    rounds = alternating_rounds([fwd_bwd(ours_f), fwd_bwd(bnb_f), fwd_bwd(dense_f)], LARGE_ROUNDS, rep_ms=100)
    ours, theirs, dense = (statistics.median(side) for side in zip(*rounds))
    with torch.no_grad():
        fwd_deq = bench(lambda: dequant_matmul(x, q))
        fwd_fused = bench(lambda: fused_matmul(x, q, block_m=128))
        fwd_dense = bench(lambda: F.linear(x, w))
    flops = 2 * 2 * LARGE_M * N * K
    rows.append(dict(op="fwd+bwd", shape=shape, M=LARGE_M, ours_ms=ours, bnb_ms=theirs, bf16_ms=dense, **{
        "TFLOP/s": flops / ours / 1e9, "vs_bnb": theirs / ours, "vs_bf16": dense / ours, "check": check,
        "rounds_ms": rounded(rounds), "vs_bf16_rounds": [round(d / o, 3) for o, _, d in rounds],
    }))
    rows.append(dict(op="fwd", shape=shape, M=LARGE_M, ours_ms=fwd_deq, bf16_ms=fwd_dense, alt_ms=fwd_fused, **{
        "TFLOP/s": flops / 2 / fwd_deq / 1e9, "vs_bf16": fwd_dense / fwd_deq, "check": check_fwd,
    }))
    return rows


def result_family(shapes: tuple[tuple[int, int], ...], ops: set[str], small_ms: tuple[int, ...]) -> str:
    """"kernels" for the full run, else "kernels-subset": a subset run (fewer shapes, ops or M values) must not
    overwrite the full table of the same day."""
    return "kernels" if shapes == SHAPES and ops == set(OPS) and small_ms == SMALL_MS else "kernels-subset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_list, default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="NxK,NxK,...")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--ms", type=positive_ints, default=",".join(map(str, SMALL_MS)),
                        help="small M values for the linear op")
    parser.add_argument("--name", default=None, help="result family (default: kernels, or kernels-subset for a subset)")
    add_backward_thread_option(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    shapes, small_ms = args.shapes, args.ms
    ops = set(args.ops.split(","))
    if not ops <= set(OPS):
        raise SystemExit(f"--ops {args.ops!r}: valid ops are {', '.join(OPS)}")
    suffix = set_backward_thread(args.backward_thread)
    family = args.name or result_family(shapes, ops, small_ms) + suffix
    env = environment(extra_packages=("bitsandbytes",))
    ceilings = device_ceilings()
    print(f"ceilings: {ceilings}", flush=True)
    rows: list[dict] = []
    config = {"shapes": shapes, "ops": sorted(ops), "small_m": small_ms, "large_m": LARGE_M, "blocksize": 64,
              "quant_type": "nf4", "double_quant": True, "dtype": "bfloat16", "backward_thread": args.backward_thread}
    for N, K in shapes:
        try:
            shape_rows = bench_shape(N, K, bnb, ceilings, ops, small_ms)
        except Exception as error:  # noqa: BLE001 -- record the failure, keep the other shapes' numbers
            traceback.print_exc()
            shape_rows = [{"op": "error", "shape": f"{N}x{K}", "check": f"{type(error).__name__}: {error}"}]
        rows += shape_rows
        print(markdown_table(shape_rows, COLUMNS), flush=True)
        write_results(family, rows, config, env, ceilings, COLUMNS, out_dir=args.out_dir)
        torch.cuda.empty_cache()
    write_results(family, rows, config, env, ceilings, COLUMNS, out_dir=args.out_dir, announce=True)
    return 0 if all(row["check"].startswith("ok") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
