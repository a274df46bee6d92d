"""Benchmark a LoRA-on-NF4 layer (forward + backward) against peft on bitsandbytes and bf16 nn.Linear.

    PYTHONPATH=.bnb:. python benchmarks/lora.py [--out DIR] [--shapes 4096x4096,...] [--ranks 16,64] [--m 4096]
        [--backward-thread autograd|calling]

Case (the LoRA issue's): M = 4096 tokens through one Llama-2-7B projection (N, K) -- q/k/v/o
(4096, 4096), gate/up (11008, 4096), down (4096, 11008) -- with a rank-r adapter, r in (16, 64),
bf16 compute, LoRA weights stored in fp32 (peft's default), no dropout. One random bf16 weight is
quantized once by bitsandbytes (NF4, blocksize 64, double quantization) and every peer uses it
(ours reads the same bytes through ``from_bnb_state_dict``):

- ours: ``nf4lora.lora.LoraLinear`` on ``NF4Linear`` (training path: ``fused.lora_linear``, base
  GEMM and LoRA update in one autograd node); also ``unfused``: ``nf4_linear`` then ``lora_add``,
  to show what the fusion buys;
- peft: ``peft``'s ``Linear4bit`` LoRA layer on a bitsandbytes ``Linear4bit`` holding the same bytes;
- bf16: plain ``nn.Linear`` in bf16, frozen (grad to x only: the same work QLoRA asks of the base)
  and trainable (grad to x and W: the usual cost of a bf16 layer's forward + backward).

One step is ``y = layer(x)`` then ``torch.autograd.grad(y, [x, A, B], dy)`` (``[x]`` or ``[x, W]``
for bf16), so no gradient accumulates between repetitions. Backward runs on autograd's worker thread (torch's
default) or, with ``--backward-thread calling``, on the calling thread for every peer, as nf4lora's trainer runs it
(results then go to ``<date>_lora-calling-thread_<gpu>``). Before timing, our output and all three
gradients are checked against peft's (relative max error, bf16). Reported per row: median ms per
step, peak extra memory of one step, and ratios: ours / bf16 frozen and ours / bf16 trainable
(target <= 1.15), peft / ours (> 1: ours is faster). Where a step is bound by host time (4096 x 4096
on the H200 machine), ``*_gpu_ms`` add the GPU's busy time per step (kernels and copies, from
``torch.profiler``) for ours and both bf16 layers, and ours' ratios to them. Prints a table, then one JSON line; writes
``<date>_lora_<gpu>.{json,md}`` into ``--out`` (default benchmarks/results), or ``<date>_lora-subset_<gpu>`` for a
run on fewer shapes or ranks or another M.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_backward_thread_option, bench, device_busy_ms, device_ceilings, environment, markdown_table,
    positive_int, positive_ints, set_backward_thread, shape_list, write_results,
)
from nf4lora.lora import LoraConfig, LoraLinear  # noqa: E402
from nf4lora.lora.functional import lora_add  # noqa: E402
from nf4lora.nf4.linear import NF4Linear  # noqa: E402
from nf4lora.nf4.state_dict import from_bnb_state_dict  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PROJ = {(4096, 4096): "q/k/v/o", (11008, 4096): "gate/up", (4096, 11008): "down"}
RANKS = (16, 64)
M = 4096
ALPHA = 16
# bf16 outputs and gradients, a few roundings deep on each side (peft runs the LoRA branch in fp32): the
# issue's bf16 bound.
CHECK_TOL = 1e-2
COLUMNS = (
    "proj", "shape", "r", "ours_ms", "unfused_ms", "peft_bnb_ms", "bf16_frozen_ms", "bf16_train_ms",
    "ours/bf16_frozen", "ours/bf16_train", "peft/ours", "ours_gpu_ms", "bf16_frozen_gpu_ms", "bf16_train_gpu_ms",
    "gpu ours/bf16_frozen", "gpu ours/bf16_train", "ours_MiB", "peft_MiB", "check",
)


class _OneLayer(nn.Module):
    """The container peft needs; flagged 4-bit so that peft picks its bitsandbytes LoRA layer."""

    is_loaded_in_4bit = True

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32."""
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).abs().max() / ref.abs().max())


def build_peers(n: int, k: int, r: int, device: str) -> dict:
    """Every peer on one random (n, k) bf16 weight; the LoRA weights of ours are copied from peft's."""
    import bitsandbytes as bnb
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
    nn.init.normal_(dense.weight, std=1 / math.sqrt(k))
    dense.requires_grad_(False)
    trainable = copy.deepcopy(dense).requires_grad_(True)

    q4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    q4.weight = bnb.nn.Params4bit(dense.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                  blocksize=64, compress_statistics=True)
    q4 = q4.to(device)  # quantizes on the device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_OneLayer(q4), PeftLoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"],
                                                                  init_lora_weights=False))
    peft_layer = peft_model.base_model.model.proj

    # The very bytes bitsandbytes produced, read through its state-dict format.
    nf4 = NF4Linear(from_bnb_state_dict(q4.state_dict(), "weight"), None, compute_dtype=torch.bfloat16)
    ours = LoraLinear(nf4, "default", LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"]))
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B["default"].weight.copy_(peft_layer.lora_B["default"].weight)
    same_weight = torch.equal(nf4.dequantized_weight(torch.bfloat16),
                              bnb.functional.dequantize_4bit(q4.weight.data, q4.weight.quant_state).bfloat16())
    lora_params = [ours.lora_A["default"].weight, ours.lora_B["default"].weight]

    def unfused(x: torch.Tensor) -> torch.Tensor:
        a, b = (p.to(x.dtype) for p in lora_params)
        return lora_add(nf4(x), x, a, b, ours.scaling["default"])

    return {
        "ours": (ours, lora_params),
        "ours_unfused": (unfused, lora_params),
        "peft": (peft_model, [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]),
        "bf16_frozen": (dense, []),
        "bf16_train": (trainable, [trainable.weight]),
        "same_weight": same_weight,
    }


def step_fn(module, params: list[torch.Tensor], x: torch.Tensor, dy: torch.Tensor):
    """One forward + backward; returns (y, grads for [x, *params])."""

    def step():
        y = module(x)
        return y, torch.autograd.grad(y, [x, *params], dy)

    return step


def check(peers: dict, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Max relative error of ours (fused and unfused) vs peft over y, grad_x, grad_A and grad_B; NaN if any is."""
    peft_y, peft_g = step_fn(*peers["peft"], x, dy)()
    errors = []
    for name in ("ours", "ours_unfused"):
        y, g = step_fn(*peers[name], x, dy)()
        errors += [rel_err(a, b) for a, b in zip((y, *g), (peft_y, *peft_g))]
    # builtin max keeps its first operand when comparing with NaN, so a NaN after the first would pass
    return float(torch.tensor(errors).max())


def peak_mib(fn, device: str) -> float | None:
    """Peak memory one call allocates beyond what was live before it, MiB (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(n: int, k: int, r: int, m: int, device: str, time_it: bool) -> dict:
    torch.manual_seed(0)
    peers = build_peers(n, k, r, device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
    err = check(peers, x, dy)
    ok = err < CHECK_TOL and peers["same_weight"]
    status = "ok" if ok else "FAIL"
    row = {"proj": PROJ.get((n, k), ""), "shape": f"{n}x{k}", "r": r, "M": m, "check": f"{status} {err:.1e}"}
    if not ok:
        same = peers["same_weight"]
        print(f"check failed for {n}x{k} r={r}: rel err {err:.2e}, dequantized weights equal bnb's: {same}", flush=True)
    if time_it:
        names = ("ours", "ours_unfused", "peft", "bf16_frozen", "bf16_train")
        steps = {name: step_fn(*peers[name], x, dy) for name in names}
        ms = {name: bench(fn) for name, fn in steps.items()}
        gpu = {name: device_busy_ms(steps[name]) for name in ("ours", "bf16_frozen", "bf16_train")}
        row.update({
            "ours_ms": ms["ours"], "unfused_ms": ms["ours_unfused"], "peft_bnb_ms": ms["peft"],
            "bf16_frozen_ms": ms["bf16_frozen"],
            "bf16_train_ms": ms["bf16_train"],
            "ours/bf16_frozen": ms["ours"] / ms["bf16_frozen"], "ours/bf16_train": ms["ours"] / ms["bf16_train"],
            "peft/ours": ms["peft"] / ms["ours"],
            "ours_gpu_ms": gpu["ours"], "bf16_frozen_gpu_ms": gpu["bf16_frozen"], "bf16_train_gpu_ms": gpu["bf16_train"],
            "gpu ours/bf16_frozen": gpu["ours"] / gpu["bf16_frozen"], "gpu ours/bf16_train": gpu["ours"] / gpu["bf16_train"],
            "ours_MiB": peak_mib(steps["ours"], device), "peft_MiB": peak_mib(steps["peft"], device),
        })
    return row


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def result_family(shapes: tuple[tuple[int, int], ...], ranks: tuple[int, ...], m: int) -> str:
    """"lora" for the issue's case (every shape and rank at M = 4096), else "lora-subset", so that a run on fewer
    shapes or ranks does not take the full table's name."""
    return "lora" if shapes == SHAPES and ranks == RANKS and m == M else "lora-subset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results)")
    parser.add_argument("--shapes", type=shape_list, default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="NxK,NxK,...")
    parser.add_argument("--ranks", type=positive_ints, default=",".join(map(str, RANKS)), help="r,r,...")
    parser.add_argument("--m", type=positive_int, default=M, help="tokens per step")
    parser.add_argument("--check-only", action="store_true", help="correctness checks only (runs on CPU too)")
    add_backward_thread_option(parser)
    args = parser.parse_args(argv)
    shapes, ranks = args.shapes, args.ranks
    family = result_family(shapes, ranks, args.m) + set_backward_thread(args.backward_thread)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    time_it = not args.check_only
    if time_it and device != "cuda":
        raise SystemExit("timing needs a CUDA GPU; use --check-only on the CPU")
    config = {"shapes": shapes, "ranks": ranks, "M": args.m, "lora_alpha": ALPHA, "dtype": "bfloat16",
              "lora_dtype": "float32", "blocksize": 64, "double_quant": True, "dropout": 0.0,
              "backward_thread": args.backward_thread}
    env = environment(extra_packages=("bitsandbytes", "peft"))
    ceilings = device_ceilings() if time_it else {}
    rows = [run_case(n, k, r, args.m, device, time_it) for n, k in shapes for r in ranks]
    print(markdown_table(rows, COLUMNS), flush=True)
    summary = {"checks_ok": all(row["check"].startswith("ok") for row in rows)}
    if time_it:
        summary.update({
            "geomean_ours/bf16_frozen": geomean([row["ours/bf16_frozen"] for row in rows]),
            "geomean_ours/bf16_train": geomean([row["ours/bf16_train"] for row in rows]),
            "geomean_peft/ours": geomean([row["peft/ours"] for row in rows]),
            "max_ours/bf16_frozen": max(row["ours/bf16_frozen"] for row in rows),
            "max_ours/bf16_train": max(row["ours/bf16_train"] for row in rows),
            "max_gpu_ours/bf16_frozen": max(row["gpu ours/bf16_frozen"] for row in rows),
            "max_gpu_ours/bf16_train": max(row["gpu ours/bf16_train"] for row in rows),
        })
        text = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        paths = write_results(family, rows, config, env, ceilings, COLUMNS, summary=text, out_dir=args.out)
        summary["results"] = [str(p) for p in paths]
    print(json.dumps({"family": family, **summary, "ceilings": ceilings}))
    return 0 if summary["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
