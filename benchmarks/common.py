"""Shared benchmark harness: environment record, timing, device ceilings, result files.

Every benchmark family (``benchmarks/<family>.py``) uses it the same way:

    env = environment(extra_packages=("bitsandbytes",))
    ceilings = device_ceilings()                 # measured copy bandwidth and bf16 matmul rate
    ms = bench(fn)                               # median ms, CUDA events via triton's do_bench
    ms = bench_rotating([fn_a, fn_b, ...])       # one call per input copy, inside a CUDA graph
    write_results("kernels", rows, config, env, ceilings, columns)  # an earlier run that day moves to -runN

Timing rules (METHOD.md): warm up first, take the median, and rotate among enough input copies
that the working set exceeds the L2 cache, so that small shapes are not timed from cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Working set the rotating benchmarks cycle through, several times the H200's 60 MB L2.
ROTATION_BYTES = 256 * 2**20
MAX_COPIES = 64


BACKWARD_THREADS = ("autograd", "calling")


def positive_int(text: str) -> int:
    """argparse type: one integer >= 1, or a one-line error naming the bad value."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; valid: 1, 2, 3, ...")
    return int(text)


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers >= 1 ("1,2,16" -> (1, 2, 16))."""
    if not all(item.strip().isdigit() and int(item) >= 1 for item in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive integers; valid: e.g. 1,2,16")
    return tuple(int(item) for item in text.split(","))


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """argparse type: comma-separated weight shapes NxK ("4096x4096,11008x4096" -> ((4096, 4096), (11008, 4096)))."""
    try:
        shapes = tuple(positive_ints(item.replace("x", ",")) for item in text.split(","))
    except argparse.ArgumentTypeError:
        shapes = ()
    if not shapes or any(len(shape) != 2 for shape in shapes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of NxK shapes; valid: e.g. 4096x4096,11008x4096")
    return shapes


def add_backward_thread_option(parser) -> None:
    """``--backward-thread autograd|calling`` for the benchmarks that time a backward pass."""
    parser.add_argument(
        "--backward-thread", choices=BACKWARD_THREADS, default="autograd",
        help="where backward runs: autograd's per-GPU worker thread (torch's default) or the calling thread "
             "(torch.autograd.set_multithreading_enabled(False), as nf4lora's trainer runs it); applies to every peer",
    )


def set_backward_thread(choice: str) -> str:
    """Apply ``--backward-thread`` for the rest of the process; returns the family-name suffix for the results."""
    torch.autograd.set_multithreading_enabled(choice == "autograd")
    return "" if choice == "autograd" else "-calling-thread"


def git_sha() -> str:
    """HEAD's sha with ``-dirty`` when the tree has changes, or ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_version(name: str) -> str | None:
    """Installed version of ``name``, from its module's ``__version__`` or the distribution metadata."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
    return str(version)


def gpu_info() -> dict:
    """Name, multiprocessors, memory, L2 and compute capability of the current CUDA device."""
    if not torch.cuda.is_available():
        return {"name": "cpu"}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "capability": f"{props.major}.{props.minor}",
    }


def environment(extra_packages: Sequence[str] = ()) -> dict:
    """Everything a result depends on outside the config: versions, GPU, git sha, time."""
    packages = {name: package_version(name) for name in ("torch", "triton", *extra_packages)}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "packages": packages,
        "gpu": gpu_info(),
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "env": {k: os.environ[k] for k in ("NF4LORA_KERNELS", "TRITON_INTERPRET") if k in os.environ},
    }


# bf16 outputs of fp32 accumulators against an fp32 product on the same dequantized weight: METHOD.md's band for
# bf16 operands is 1e-3 to 1e-2 (ours measured 1.7e-3 to 2.7e-3 on the H200, bitsandbytes up to 3.7e-3)
REL_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (Frobenius norms)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def judge(exact: dict[str, bool], errors: dict[str, float], info: dict | None = None) -> str:
    """The check cell: "ok" when every ``exact`` comparison holds and every relative error is <= REL_TOL (NaN
    fails), else "FAIL"; then every value, ``info``'s too (reported, not judged: the peers' own results)."""
    ok = all(exact.values()) and all(err <= REL_TOL for err in errors.values())
    values = {**exact, **errors, **(info or {})}
    return ("ok" if ok else "FAIL") + ": " + ", ".join(
        f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def bench(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def alternating_rounds(fns: Sequence[Callable[[], object]], rounds: int, rep_ms: int = 200) -> list[list[float]]:
    """``bench`` times of each of ``fns`` in ``rounds`` rounds: [round][fn], the starting fn rotating by one each
    round, so that clock drift over the run (thermal, power, host) falls on every side alike."""
    times = []
    for r in range(rounds):
        order = [(r + i) % len(fns) for i in range(len(fns))]
        timed = {i: bench(fns[i], rep_ms=rep_ms) for i in order}
        times.append([timed[i] for i in range(len(fns))])
    return times


def device_busy_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """Milliseconds per call that the GPU spends in kernels and copies (``torch.profiler``), idle time excluded.

    Where a step is bound by host time, ``bench`` measures the host; this is the device's share, the time
    the same work takes once the host runs ahead (as in a model whose layers queue behind each other).
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    # CUDA activity only: every event is a kernel, memcpy or memset, none nested in another
    return sum(event.device_time_total for event in prof.key_averages()) / calls / 1e3


def copies_for(nbytes: int) -> int:
    """How many copies of an input of ``nbytes`` make a working set of ROTATION_BYTES (1..MAX_COPIES)."""
    return max(1, min(MAX_COPIES, math.ceil(ROTATION_BYTES / max(nbytes, 1))))


def bench_rotating(fns: Sequence[Callable[[], object]], rep_ms: int = 200) -> float:
    """Median milliseconds per call of one call of each ``fns[i]`` (one per input copy).

    All calls are captured into one CUDA graph, so launch overhead (Python, autotuner lookup)
    drops out and the time is the device's; the graph's median replay time is divided by
    ``len(fns)``. Each fn must be capturable (no host sync) and already warmed up (autotuned).
    """
    import triton.testing

    for fn in fns:
        fn()
    torch.cuda.synchronize()
    try:
        graph = _capture(fns)
    except RuntimeError as error:  # a peer that cannot be captured is timed call by call instead
        print(f"graph capture failed ({error}); timing without a graph", flush=True)
        torch.cuda.synchronize()
        return bench(lambda: [fn() for fn in fns], rep_ms=rep_ms) / len(fns)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median")
    return float(ms) / len(fns)


def _capture(fns: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """One CUDA graph replaying every fn in order (after a warm-up on a side stream, as capture needs).

    Every fn's output stays alive until the capture ends: the graph's pool hands a block freed during capture to
    the next allocation, so dropped outputs would all be one buffer, rewritten by every call and, where it fits
    (a 4096 x 4096 dequantize writes 34 MB), timed from the L2 cache instead of DRAM.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn() for fn in fns]
    del outputs
    return graph


def streaming_rate(nbytes: int, ms: float, copy_gbs: float) -> dict[str, float]:
    """Result columns for ``nbytes`` moved in ``ms``: "GB/s", and "%copy" of the measured copy bandwidth."""
    return {"GB/s": nbytes / ms / 1e6, "%copy": 100 * nbytes / ms / 1e6 / copy_gbs}


def peer_ratios(times: dict[str, float]) -> dict[str, float]:
    """"vs_<peer>" = <peer>_ms / ours_ms for every "<peer>_ms" in ``times`` besides "ours_ms" (> 1: ours is faster)."""
    return {f"vs_{key.removesuffix('_ms')}": ms / times["ours_ms"] for key, ms in times.items() if key != "ours_ms"}


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Rate of an n x n x n matmul on random data (never zeros: they run faster), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def device_ceilings() -> dict:
    """The two ceilings every result is compared with, measured now on this device."""
    return {"copy_gbs": round(copy_bandwidth_gbs(), 1), "bf16_matmul_tflops": round(matmul_tflops(), 1)}


def _gpu_tag(env: dict) -> str:
    name = env["gpu"]["name"].lower().replace("nvidia", "").strip()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "cpu"


def _ceilings_text(ceilings: dict) -> str:
    """The results header's ceilings clause; empty where the family measured none (not "None GB/s")."""
    if "copy_gbs" not in ceilings:
        return ""
    return (f"; measured copy bandwidth {ceilings['copy_gbs']} GB/s,"
            f" bf16 matmul {ceilings['bf16_matmul_tflops']} TFLOP/s")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` restricted to ``columns`` (missing cells blank)."""

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _result_paths(out_dir: Path, env: dict, family: str) -> list[Path]:
    """``<out_dir>/<day>_<family>_<gpu>.json`` and ``.md`` for the run that ``env`` describes."""
    stem = f"{env['date'][:10]}_{family}_{_gpu_tag(env)}"
    return [out_dir / f"{stem}.{ext}" for ext in ("json", "md")]


def keep_earlier_run(out_dir: Path, env: dict, family: str) -> None:
    """Move another run's ``<day>_<family>_<gpu>.{json,md}`` aside to the next free ``<day>_<family>-runN_<gpu>``,
    so that the newest run of a day holds the plain name and no run is overwritten. The files of this run (same
    ``env["date"]``: a benchmark rewrites its table after every shape) stay in place."""
    earlier = _result_paths(out_dir, env, family)
    if not any(path.exists() for path in earlier) or _run_date(earlier[0]) == env["date"]:
        return
    n = 1
    while any(path.exists() for path in _result_paths(out_dir, env, f"{family}-run{n}")):
        n += 1
    for path, aside in zip(earlier, _result_paths(out_dir, env, f"{family}-run{n}")):
        if path.exists():
            path.rename(aside)


def _run_date(json_path: Path) -> str | None:
    """The ``environment.date`` a results JSON records, or None when it is missing or unreadable."""
    try:
        return json.loads(json_path.read_text())["environment"]["date"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_results(
    family: str,
    rows: Sequence[dict],
    config: dict,
    env: dict,
    ceilings: dict,
    columns: Sequence[str],
    summary: str = "",
    out_dir: Path | str | None = None,
    announce: bool = False,
) -> tuple[Path, Path]:
    """Write ``<date>_<family>_<gpu>.json`` (everything) and ``.md`` (summary + table); return both paths.
    With ``announce``, also print the table and a last JSON line naming the files and the ceilings."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_earlier_run(out_dir, env, family)
    json_path, md_path = _result_paths(out_dir, env, family)
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    payload = {"family": family, "config": config, "environment": env, "ceilings": ceilings, "rows": list(rows)}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    header = (
        f"# {family} on {env['gpu']['name']}\n\n"
        f"{env['date']}, git {env['git_sha']}, "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
        + _ceilings_text(ceilings) + ".\n\n"
    )
    md_path.write_text(header + (summary + "\n\n" if summary else "") + markdown_table(rows, columns) + "\n")
    if announce:
        print(markdown_table(rows, columns))
        print(json.dumps({"results": [str(json_path), str(md_path)], "ceilings": ceilings}))
    return json_path, md_path

