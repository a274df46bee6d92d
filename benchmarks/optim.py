"""Benchmark AdamW / PagedAdamW (32- and 8-bit states) against torch's fused AdamW and bitsandbytes' paged AdamW.

    PYTHONPATH=.bnb:. python benchmarks/optim.py [--out DIR] [--sets lora,dense] [--check-only]

Parameter sets (float32 parameters and gradients, as QLoRA keeps its adapters):
- lora: Llama-2-7B's LoRA adapters, r=64 on all seven linear layers of 32 blocks: 448 tensors, 159.9M parameters;
- dense: 64 tensors of 4096 x 4096, 1.07B parameters.

Rows per set: torch.optim.AdamW(fused=True); ours `AdamW`; `PagedAdamW` with the default budget (everything
fits) and with a budget of 1/8 of the states; the same three with 8-bit states; bitsandbytes PagedAdamW32bit and
PagedAdamW8bit (skipped when bitsandbytes does not import). Every optimizer starts from the same parameters and
fixed gradients; before timing, each is checked after 2 steps against our AdamW run on the pure-PyTorch reference
path: ours (Triton, paged or not, 32- or 8-bit) must equal it bit for bit, torch's fused AdamW must match within
1e-6 of the tensor's scale (float32, different op order); bitsandbytes' differences are reported, not judged.

Reported per row: median step ms (CUDA events, triton do_bench, Python overhead included as in training), GPU
memory the optimizer holds after its steps (allocated delta) and its peak during a step, the device memory it
takes (`cudaMemGetInfo` delta: counts bitsandbytes' managed pages that the allocator does not see), and for the
1/8 budget rows the copy floors: paged-out bytes copied in then out at the measured pinned host->device and
device->host rates (copy_floor), or both directions at once at the measured duplex rate (duplex_floor); and the
step time over torch's fused AdamW's, our AdamW's and the copy floor ("this/<peer>": < 1 means this row is faster).
Then a demonstration that a training step whose forward runs out of memory (pressure made with
`torch.cuda.set_per_process_memory_fraction`) completes after `evict()` + `empty_cache()`, and equals the
unconstrained step bit for bit. Prints a table, then one JSON line; writes `<date>_optim_<gpu>.{json,md}` into
`--out` (default benchmarks/results). `--check-only` runs the correctness checks on small sets (CPU too).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    bench, device_ceilings, environment, markdown_table, positive_int, write_results,
)
from nf4lora.kernels import use_kernels  # noqa: E402
from nf4lora.optim import AdamW, PagedAdamW  # noqa: E402
from nf4lora.optim.adamw import state_layout  # noqa: E402

HYPER = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
CHECK_STEPS = 2
LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32}
COLUMNS = (
    "set", "optimizer", "step_ms", "this/torch_fused", "this/adamw", "held_MiB", "peak_MiB", "device_MiB",
    "budget_MiB", "paged_out_MiB", "copy_floor_ms", "duplex_floor_ms", "this/copy_floor", "check",
)
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# Parameter sets
# ----------------------------------------------------------------------------------------------------------------


def lora_shapes(layers: int, r: int) -> list[tuple[int, int]]:
    """A (r, in) and B (out, r) of every q/k/v/o/gate/up/down projection of `layers` Llama-2-7B blocks."""
    h, i = LLAMA_7B["hidden"], LLAMA_7B["intermediate"]
    projections = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]  # (out, in)
    return [shape for _ in range(layers) for out, inp in projections for shape in ((r, inp), (out, r))]


def dense_shapes(count: int, dim: int) -> list[tuple[int, int]]:
    return [(dim, dim)] * count


def make_problem(shapes, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Initial parameters and fixed gradients (float32), generated on `device`."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=generator, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=generator, device=device) * 1e-3 for s in shapes]
    return params, grads


def state_bytes(shapes, bits: int) -> int:
    return sum(state_layout(a * b, bits == 8 and a * b >= 4096)[1] for a, b in shapes)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def device_used(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return total - free


def time_ms(fn: Callable[[], object], device) -> float:
    if device.type == "cuda":
        return bench(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def host_copy_bandwidth(nbytes: int = 1 << 30) -> dict:
    """Pinned host->device, device->host and both at once on two streams, GB/s (bytes / time)."""
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_in = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev_out = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d_stream, d2h_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        h2d_stream.wait_stream(torch.cuda.current_stream())
        d2h_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(h2d_stream):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(d2h_stream):
            host_out.copy_(dev_out, non_blocking=True)
        torch.cuda.current_stream().wait_stream(h2d_stream)
        torch.cuda.current_stream().wait_stream(d2h_stream)

    h2d = bench(lambda: dev_in.copy_(host_in, non_blocking=True))
    d2h = bench(lambda: host_out.copy_(dev_out, non_blocking=True))
    duplex = bench(both)
    return {"h2d_gbs": round(nbytes / h2d / 1e6, 1), "d2h_gbs": round(nbytes / d2h / 1e6, 1),
            "duplex_gbs": round(2 * nbytes / duplex / 1e6, 1)}


def scale_rel_err(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max |a - b| / max |b| over all tensors; NaN if any element of ``ours`` is (builtin max would drop it)."""
    err = torch.stack([(a.float() - b.float()).abs().max() for a, b in zip(ours, ref)]).max()
    return float(err / torch.stack([b.abs().max() for b in ref]).max())


def outside_8bit_tolerance(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Fraction of elements outside bitsandbytes' 8-bit parameter tolerance (atol 1e-5, rtol 1e-3)."""
    bad = sum(int((~torch.isclose(a.float(), b.float(), atol=1e-5, rtol=1e-3)).sum()) for a, b in zip(ours, ref))
    return bad / sum(b.numel() for b in ref)


# ----------------------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------------------


def optimizers(shapes, device) -> dict[str, tuple[Callable, int, dict]]:
    """name -> (factory(params), state bits, info) for the rows of one set."""
    total32, total8 = state_bytes(shapes, 32), state_bytes(shapes, 8)
    rows = {
        "torch_fused": (lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True), 32, {}),
        "adamw32": (lambda ps: AdamW(ps, **HYPER), 32, {}),
        "paged32_fit": (lambda ps: PagedAdamW(ps, **HYPER), 32, {}),
        "paged32_1/8": (lambda ps: PagedAdamW(ps, **HYPER, gpu_budget_bytes=total32 // 8), 32,
                        {"budget": total32 // 8}),
        "adamw8": (lambda ps: AdamW(ps, **HYPER, optim_bits=8), 8, {}),
        "paged8_fit": (lambda ps: PagedAdamW(ps, **HYPER, optim_bits=8), 8, {}),
        "paged8_1/8": (lambda ps: PagedAdamW(ps, **HYPER, optim_bits=8, gpu_budget_bytes=total8 // 8), 8,
                       {"budget": total8 // 8}),
    }
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            print(f"bitsandbytes peers skipped: {error}", flush=True)
        else:
            rows["bnb_paged32"] = (lambda ps: bnb.optim.PagedAdamW32bit(ps, **HYPER), 32, {})
            rows["bnb_paged8"] = (lambda ps: bnb.optim.PagedAdamW8bit(ps, **HYPER), 8, {})
    return rows


def check(name: str, bits: int, params, references: dict) -> str:
    """Compare `params` after CHECK_STEPS with the reference-path run (module docstring's rules)."""
    if name.startswith(("adamw", "paged")):
        same = all(torch.equal(a, b) for a, b in zip(params, references[bits]))
        return "ok (bit-exact)" if same else f"FAIL (rel {scale_rel_err(params, references[bits]):.1e})"
    if name == "torch_fused":
        err = scale_rel_err(params, references[32])
        return f"{'ok' if err <= 1e-6 else 'FAIL'} (rel {err:.1e})"
    # peers with their own kernels: reported, not judged (8-bit codes differ where their CUDA rounding does)
    if bits == 32:
        return f"peer (rel {scale_rel_err(params, references[32]):.1e})"
    return f"peer ({outside_8bit_tolerance(params, references[8]):.1e} outside 8-bit tol)"


def run_set(set_name: str, shapes, device, time_it: bool, copy_bw: dict) -> list[dict]:
    init, grads = make_problem(shapes, device)
    references: dict[int, list[torch.Tensor]] = {}
    for bits in (32, 8):  # our AdamW on the pure-PyTorch path: the reference every row is checked against
        params = [p.clone() for p in init]
        optimizer = AdamW(params, **HYPER, optim_bits=bits)
        for p, g in zip(params, grads):
            p.grad = g
        with use_kernels("reference"):
            for _ in range(CHECK_STEPS):
                optimizer.step()
        references[bits] = [p.detach() for p in params]
        del optimizer
    rows = []
    for name, (factory, bits, info) in optimizers(shapes, device).items():
        try:
            row = run_optimizer(name, factory, bits, info, init, grads, references, device, time_it, copy_bw)
        except (RuntimeError, TypeError, AttributeError) as error:
            if not name.startswith("bnb"):
                raise
            # a peer that fails on this machine (its CUDA library, its API) is reported, not fatal
            row = {"optimizer": name, "bits": bits, "check": f"peer error: {error!r}"[:200]}
        row["set"] = set_name
        rows.append(row)
        print(f"{set_name:6s} {name:12s} {row.get('step_ms', float('nan')):9.3f} ms  {row['check']}", flush=True)
        sync(device)
    if time_it:
        add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each timed row's step time over torch's fused AdamW's, over our AdamW's with as many state bits, and over
    its copy floor, as "this/<peer>" (< 1: this row is faster; the kernel benchmarks' "vs_<peer>" is the inverse)."""
    by_name = {row["optimizer"]: row for row in rows}
    for row in rows:
        if "step_ms" in row:
            row["this/torch_fused"] = row["step_ms"] / by_name["torch_fused"]["step_ms"]
            row["this/adamw"] = row["step_ms"] / by_name[f"adamw{row['bits']}"]["step_ms"]
            if row.get("copy_floor_ms"):
                row["this/copy_floor"] = row["step_ms"] / row["copy_floor_ms"]


def run_optimizer(name, factory, bits, info, init, grads, references, device, time_it, copy_bw) -> dict:
    """One row: CHECK_STEPS steps from `init`, the check, then (time_it) step time and memory."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    for p, g in zip(params, grads):
        p.grad = g
    sync(device)
    base, base_device = allocated(device), device_used(device)
    optimizer = factory(params)
    for _ in range(CHECK_STEPS):
        optimizer.step()
    sync(device)
    row = {"optimizer": name, "bits": bits, "check": check(name, bits, params, references)}
    if time_it:
        row["step_ms"] = time_ms(optimizer.step, device)
        sync(device)
        row["held_MiB"] = (allocated(device) - base) / MIB
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        sync(device)
        row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / MIB
        row["device_MiB"] = (device_used(device) - base_device) / MIB
    if "budget" in info:
        row["budget_MiB"] = info["budget"] / MIB
        row["paged_out_MiB"] = optimizer.paged_out_bytes / MIB
        if copy_bw:
            out = optimizer.paged_out_bytes
            row["copy_floor_ms"] = out / copy_bw["h2d_gbs"] / 1e6 + out / copy_bw["d2h_gbs"] / 1e6
            row["duplex_floor_ms"] = 2 * out / copy_bw["duplex_gbs"] / 1e6
            row["page_MiB"] = optimizer.page_bytes / MIB
    return row


# ----------------------------------------------------------------------------------------------------------------
# Out-of-memory demonstration
# ----------------------------------------------------------------------------------------------------------------


def oom_eviction_demo(layers: int = 16, dim: int = 4096, tokens: int = 8192) -> dict:
    """A train step whose forward runs out of memory completes after evict() + empty_cache(), bit-exactly."""
    device = torch.device("cuda", torch.cuda.current_device())  # memory-fraction calls need an index
    # Earlier stages' optimizers can linger in reference cycles (torch keeps the first one a process makes
    # reachable from a cached frame) until the cycle collector runs; if it ran mid-demo, the memory it freed
    # would defeat the cap set below. Collect now so that the cap is measured against live memory only.
    gc.collect()
    torch.cuda.empty_cache()
    generator = torch.Generator(device=device).manual_seed(1)
    weights = [torch.nn.Parameter(torch.randn(dim, dim, generator=generator, device=device) * 0.02)
               for _ in range(layers)]
    x = torch.randn(tokens, dim, generator=generator, device=device)

    def forward_backward(ws):
        h = x
        for w in ws:
            h = torch.tanh(h @ w.t())  # keeps one (tokens, dim) activation per layer for backward
        h.pow(2).mean().backward()

    optimizer = PagedAdamW(weights, **HYPER)  # default budget: every page resident
    forward_backward(weights)
    optimizer.step()  # creates the states (2 x 4 bytes per parameter, all on the GPU)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(weights)
    need = torch.cuda.max_memory_allocated() - base
    optimizer.zero_grad(set_to_none=True)
    snapshot = ([w.detach().cpu() for w in weights], optimizer.state_dict())
    states = optimizer.resident_bytes

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    # The step no longer fits beside all states. Counted from live memory, not from what the allocator reserved:
    # reserved segments carry slack (pages share 20 MiB segments) that a cap based on them would leave usable.
    allowed = torch.cuda.memory_allocated() + need - states // 2
    result = {"states_MiB": states / MIB, "step_need_MiB": need / MIB, "allowed_MiB": allowed / MIB,
              "oom_raised": False, "evicted_MiB": 0.0, "attempts": 0}
    torch.cuda.set_per_process_memory_fraction(allowed / total, device)
    try:
        done = False
        while not done and result["attempts"] < 4:
            result["attempts"] += 1
            try:
                forward_backward(weights)
                done = True
            except torch.cuda.OutOfMemoryError:
                result["oom_raised"] = True
            if not done:  # outside the except block, so the failed graph's activations are already freed
                optimizer.zero_grad(set_to_none=True)
                headroom = allowed - torch.cuda.memory_reserved()
                result["evicted_MiB"] += optimizer.evict(max(need - headroom, 0) + 256 * MIB) / MIB
                torch.cuda.empty_cache()
        if done:
            optimizer.step()  # streams the evicted pages through the double buffer
            torch.cuda.synchronize()
        result["completed"] = done
        result["budget_after_MiB"] = None if optimizer.budget is None else optimizer.budget / MIB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)

    # the same step without pressure, from the snapshot
    reference_weights = [torch.nn.Parameter(w.to(device)) for w in snapshot[0]]
    reference = AdamW(reference_weights, **HYPER)
    reference.load_state_dict(snapshot[1])
    forward_backward(reference_weights)
    reference.step()
    result["bit_exact"] = done and all(torch.equal(a, b) for a, b in zip(weights, reference_weights))
    return result


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results)")
    parser.add_argument("--sets", default="lora,dense", help="comma-separated: lora, dense")
    parser.add_argument("--lora-layers", type=positive_int, default=LLAMA_7B["layers"],
                        help="Llama blocks in the LoRA set")
    parser.add_argument("--lora-r", type=positive_int, default=64)
    parser.add_argument("--dense-tensors", type=positive_int, default=64, help="4096x4096 tensors in the dense set")
    parser.add_argument("--check-only", action="store_true", help="correctness checks only, small sets (CPU too)")
    parser.add_argument("--skip-oom-demo", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    time_it = not args.check_only
    if time_it and device.type != "cuda":
        raise SystemExit("timing needs a CUDA GPU; use --check-only on the CPU")
    if args.check_only:
        args.lora_layers, args.dense_tensors = min(args.lora_layers, 1), min(args.dense_tensors, 2)
    sets = {"lora": lora_shapes(args.lora_layers, args.lora_r), "dense": dense_shapes(args.dense_tensors, 4096)}
    chosen = [s for s in args.sets.split(",") if s]
    for name in chosen:
        if name not in sets:
            raise SystemExit(f"unknown set {name!r}; valid: {', '.join(sets)}")
    config = {"sets": {name: {"tensors": len(sets[name]), "params": sum(a * b for a, b in sets[name])}
                       for name in chosen},
              "hyper": HYPER, "check_steps": CHECK_STEPS, "lora_r": args.lora_r, "dtype": "float32"}
    env = environment(extra_packages=("bitsandbytes",))
    ceilings = device_ceilings() if time_it else {}
    copy_bw = host_copy_bandwidth() if time_it else {}
    ceilings.update(copy_bw)
    rows = [row for name in chosen for row in run_set(name, sets[name], device, time_it, copy_bw)]
    columns = COLUMNS if time_it else ("set", "optimizer", "paged_out_MiB", "check")
    print(markdown_table(rows, columns), flush=True)
    summary: dict = {"checks_ok": all(row["check"].startswith(("ok", "peer")) for row in rows)}
    if time_it:
        summary["host_copy"] = copy_bw
        for name in chosen:
            by = {row["optimizer"]: row for row in rows if row["set"] == name}
            budget_rows = [by[k] for k in ("paged32_1/8", "paged8_1/8")]
            summary[name] = {
                "adamw/torch_fused": by["adamw32"]["this/torch_fused"],
                "paged_fit/adamw": by["paged32_fit"]["this/adamw"],
                "paged_1/8/copy_floor": by["paged32_1/8"].get("this/copy_floor"),
                "paged_1/8/duplex_floor": by["paged32_1/8"]["step_ms"] / by["paged32_1/8"]["duplex_floor_ms"],
                "paged8_1/8/copy_floor": by["paged8_1/8"].get("this/copy_floor"),
                "paged_1/8_peak_within_budget+buffer": all(
                    r["peak_MiB"] <= r["budget_MiB"] + 2 * r["page_MiB"] + 1 for r in budget_rows),
                "8bit/32bit_held": by["adamw8"]["held_MiB"] / by["adamw32"]["held_MiB"],
            }
        if not args.skip_oom_demo:
            try:
                summary["oom_demo"] = oom_eviction_demo()
            except RuntimeError as error:  # recorded, so that the measurements above are still written
                summary["oom_demo"] = {"error": repr(error)[:300]}
            print("oom demo:", summary["oom_demo"], flush=True)
        text = json.dumps(summary, default=str)
        paths = write_results("optim", rows, config, env, ceilings, COLUMNS, summary=text, out_dir=args.out)
        summary["results"] = [str(p) for p in paths]
    print(json.dumps({"family": "optim", **summary, "ceilings": ceilings}, default=str))
    return 0 if summary["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
