"""Where the trainer's backward runs: autograd's per-GPU worker thread vs the calling thread, interleaved A/B.

    python benchmarks/train_backward_thread.py [--out DIR] [--rounds 5] [--steps-per-round 3] [--tiny]

The model and cases are ``benchmarks/train.py``'s (Llama-2-7B shape, random weights, NF4, gradient checkpointing,
r=16 on q/k/v/o and r=64 on all linears). One process builds the model once; per case it runs two warm-up steps,
then ``--rounds`` rounds of ``--steps-per-round`` optimizer steps in each mode, swapping which mode goes first every
round, so that drift in the machine's speed falls on both. Each step is timed alone between two synchronizations.
The mode is ``nf4lora.trainer.loop.BACKWARD_ON_CALLING_THREAD``. Also reported: the GPU's busy time per step
(kernels and copies, from ``torch.profiler``, over two steps on the calling thread), which says how much of a step
waits on the host. Results: ``<date>_train-backward-thread_<gpu>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import train  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_busy_ms, device_ceilings, environment, positive_int, write_results,
)

MODES = {"worker": False, "calling": True}  # mode -> BACKWARD_ON_CALLING_THREAD
COLUMNS = ("case", "worker_ms", "calling_ms", "worker/calling", "worker_tok/s", "calling_tok/s", "worker_range_ms",
           "calling_range_ms", "gpu_busy_ms", "host-bound share")


def time_case(trainer, rounds: int, per_round: int, device: torch.device) -> dict[str, list[float]]:
    from nf4lora.trainer import loop

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for r in range(rounds):
            for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                loop.BACKWARD_ON_CALLING_THREAD = MODES[mode]
                for _ in range(per_round):
                    train.sync(device)
                    start = time.perf_counter()
                    trainer.train_step()
                    train.sync(device)
                    times[mode].append((time.perf_counter() - start) * 1e3)
    finally:
        loop.BACKWARD_ON_CALLING_THREAD = True
    return times


def main(argv: list[str] | None = None) -> int:
    from nf4lora.lora import delete_adapter
    from nf4lora.trainer.job import prepare_for_kbit_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the result files (default benchmarks/results)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds of both modes per case")
    parser.add_argument("--steps-per-round", type=positive_int, default=3, help="optimizer steps per mode per round")
    parser.add_argument("--tiny", action="store_true", help="2-layer smoke test on any device")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("the 7B benchmark needs a CUDA GPU; use --tiny for a smoke test on the CPU")
    arch = train.TINY if args.tiny else train.LLAMA2_7B
    env = environment()
    ceilings = device_ceilings() if device.type == "cuda" else {}
    model = train.build_ours(arch, device)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    steps = 2 + args.rounds * len(MODES) * args.steps_per_round + (2 if device.type == "cuda" else 0)
    examples = train.training_rows(arch, steps)
    tokens = train.MICRO_BATCH * train.SEQ_LEN
    rows, step_ms = [], {}
    for case, spec in train.CASES.items():
        trainer = train.ours_trainer(model, spec, steps, examples, device)
        for _ in range(2):
            trainer.train_step()
        times = step_ms[case] = time_case(trainer, args.rounds, args.steps_per_round, device)
        median = {mode: statistics.median(v) for mode, v in times.items()}
        busy = device_busy_ms(trainer.train_step, calls=1) if device.type == "cuda" else None
        rows.append({
            "case": case, "worker_ms": median["worker"], "calling_ms": median["calling"],
            "worker/calling": median["worker"] / median["calling"],
            **{f"{mode}_tok/s": tokens / median[mode] * 1e3 for mode in MODES},
            **{f"{mode}_range_ms": f"{min(v):.0f}-{max(v):.0f}" for mode, v in times.items()},
            "gpu_busy_ms": busy, "host-bound share": None if busy is None else 1 - busy / median["calling"],
        })
        del trainer
        delete_adapter(model, "default")
    config = {"arch": arch, "cases": train.CASES, "micro_batch": train.MICRO_BATCH, "seq_len": train.SEQ_LEN,
              "rounds": args.rounds, "steps_per_round": args.steps_per_round, "step_ms": step_ms, "tiny": args.tiny}
    summary = ("Median ms per optimizer step in each mode, interleaved in one process; worker/calling > 1 means the "
               "calling thread is faster. gpu_busy_ms: the GPU's busy time for one more step (calling thread).")
    write_results("train-backward-thread", rows, config, env, ceilings, COLUMNS, summary=summary, out_dir=args.out,
                  announce=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
