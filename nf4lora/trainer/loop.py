"""The optimization loop: gradient accumulation, clipping, schedule, evaluation, checkpoints, Ctrl-C and OOM.

One optimizer step consumes ``grad_accum`` micro-batches. The loss is the token-weighted mean over all of them:
each micro-batch contributes ``sum(token losses) / total targets of the step``, so the gradient equals that of one
big batch whatever the padding or the split. Cross-entropy is computed in float32 from the logits.

Exactness of ``--resume``: the data order is a function of the micro-batch index (see ``data.BatchPlan``), and a
checkpoint stores the optimizer, scheduler and every RNG state after a completed step, so a resumed run replays the
same micro-batches with the same dropout masks and produces the same losses bit for bit on the same machine.

With fp16 compute a dynamic loss scaler (``torch.amp.GradScaler``) scales the loss, unscales before clipping and
skips steps whose gradients overflowed; bf16 and fp32 need none. Without a scaler nothing skips a step whose loss
or gradient norm is not finite, and its update would make every LoRA weight NaN for good: the run stops before it,
with :class:`TrainingFailed` naming the last complete checkpoint.

A write into the run directory that fails (a full disk, a quota, a read-only mount) stops the run with one
:class:`TrainingFailed` line: the cause, the space left, the last complete checkpoint and the ``--resume`` that
continues from it (checkpoints are written atomically, so the previous one is whole).

Ctrl-C: the first SIGINT asks the loop to stop after the current step, which then writes a checkpoint and
returns; a second SIGINT interrupts at once. On CUDA out-of-memory in forward/backward, the paged optimizer's state
is evicted to the host, the cache emptied, and the step retried once from the same RNG state; a second failure
raises :class:`TrainingOOM` with what to change.

Backward runs on the calling thread (``torch.autograd.set_multithreading_enabled(False)``) instead of autograd's
per-GPU worker thread. The GPU work is the same; the handoff to that thread and back costs host time, and a QLoRA
step on the H200 machine here waits on the host for about half its time (GPU busy 184-215 ms of 320-490 ms per
Llama-2-7B step). Interleaved in one process (benchmarks/results/2026-11-28_train-backward-thread_h200.md), the
calling thread gave 1.13x the tokens/s at r=64 on all linears and 0.97x at r=16 on q/k/v/o, within that machine's
step-to-step noise. A single nf4_linear forward + backward at 4096x4096, M=4096 took 0.42-0.44 ms in every
recorded run on the calling thread and anywhere from 0.40 to 0.69 ms on the worker thread.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import IGNORE_INDEX, Batch, BatchPlan
from .metrics import METRICS_FILE, MetricsLog, Progress, gpu_memory_gib, perplexity


# Where backward runs (module docstring); benchmarks/train_backward_thread.py flips it to time both.
BACKWARD_ON_CALLING_THREAD = True
# A full disk fails each writer its own way (measured on a full tmpfs): Python's file writes raise OSError,
# torch.save a RuntimeError ("unexpected pos 576 vs 534"), safetensors a SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class TrainingFailed(RuntimeError):
    """Training cannot go on; the one-line message says why, what was kept and what to change."""


class TrainingOOM(TrainingFailed):
    """Out of memory even after evicting optimizer state; the message says which flags to change."""


@contextmanager
def reporting_write(what: str, run_dir: Path, then: str) -> Iterator[None]:
    """Turn a failed write of ``what`` into ``run_dir`` into one TrainingFailed line: the cause, the space left on
    that file system (the usual cause) and ``then``, what was kept and how to go on."""
    try:
        yield
    except WRITE_ERRORS as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        free = shutil.disk_usage(run_dir).free // 2**20
        raise TrainingFailed(f"could not write {what} in {run_dir} ({cause}; {free} MiB free there); {then}") from exc


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier on the peak lr for optimizer step ``s`` (0-based): linear warmup, then constant/linear/cosine."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies in float32. logits: (B, T, V) any float dtype; labels: (B, T) int64."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """Right padding never reaches a real token through a causal mask, so unpacked rows need no mask at all
    (SDPA's fast causal path); packed rows pass segment ids, which the model turns into block-diagonal attention."""
    if batch.packed:
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "segment_ids": batch.segment_ids}
    return {"input_ids": batch.input_ids}


@dataclass
class LoopState:
    """What a checkpoint restores besides the adapter and optimizer."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


@dataclass
class Trainer:
    """Runs optimizer steps ``state.step + 1 .. total_steps`` over the first ``total_micro_batches`` of ``plan``.

    ``save_adapter(dir)`` writes the peft-format adapter of ``model``. ``on_step(trainer, record)`` is called after
    each optimizer step (tests use it to request a stop, as Ctrl-C does), ``on_checkpoint(path)`` after each
    checkpoint is complete (the job then drops the run that --overwrite replaces).
    """

    config: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: BatchPlan
    total_steps: int
    run_dir: Path
    device: torch.device
    save_adapter: Callable[[Path], None]
    val_batches: list[Batch] = field(default_factory=list)
    total_micro_batches: int | None = None  # where the data ends; None: total_steps full accumulation windows
    state: LoopState = field(default_factory=LoopState)
    on_step: Callable[[Trainer, dict[str, Any]], None] | None = None
    stop_requested: bool = False
    last_checkpoint: Path | None = None  # the newest complete one; on resume, the one resumed from
    progress: Progress = field(default_factory=lambda: Progress(0, 0, enabled=False))
    scaler: torch.amp.GradScaler | None = None  # fp16 compute only: dynamic loss scaling
    on_checkpoint: Callable[[Path], None] | None = None

    def __post_init__(self) -> None:
        if self.total_micro_batches is None:
            self.total_micro_batches = self.total_steps * self.config.grad_accum

    def request_stop(self) -> None:
        """Stop after the current optimizer step and write a checkpoint (what Ctrl-C does)."""
        self.stop_requested = True

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------ one step
    def _accumulate(self, batches: list[Batch], targets: int) -> float:
        total = 0.0
        for batch in batches:
            logits = self.model(**model_inputs(batch))
            loss_sum = causal_lm_loss_sum(logits, batch.labels)
            loss = loss_sum / targets
            with torch.autograd.set_multithreading_enabled(not BACKWARD_ON_CALLING_THREAD):
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss_sum.item()
        return total / targets

    def _step_with_oom_retry(self, batches: list[Batch], targets: int) -> float:
        rng = rng_state()
        try:
            return self._accumulate(batches, targets)
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            evict = getattr(self.optimizer, "evict", None)
            freed = evict(2**62) if evict is not None else 0
            torch.cuda.empty_cache()
            self.progress.write(f"CUDA out of memory at step {self.state.step + 1}; evicted {freed / 2**20:.0f} MiB "
                                 f"of optimizer state to the host, retrying the step")
            set_rng_state(rng)
        try:
            return self._accumulate(batches, targets)
        except torch.cuda.OutOfMemoryError:
            raise TrainingOOM(
                f"CUDA out of memory at step {self.state.step + 1} with --micro-batch {self.config.micro_batch} "
                f"x --max-len {self.config.max_len} even after evicting optimizer state; lower --micro-batch "
                f"(raise --grad-accum to keep the effective batch), lower --max-len, or keep "
                f"--gradient-checkpointing on") from None

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record."""
        self.model.train()
        first = self.state.step * self.config.grad_accum
        last = min(first + self.config.grad_accum, self.total_micro_batches)
        batches = [self.plan.micro_batch_at(i).to(self.device) for i in range(first, last)]
        targets = sum(b.num_targets() for b in batches)
        lr = self.scheduler.get_last_lr()[0]
        start = time.perf_counter()
        loss = self._step_with_oom_retry(batches, targets) if targets else 0.0
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, limit))
        # A scaler skips such a step itself; without one the update would make every LoRA weight NaN for good.
        if self.scaler is None and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._diverged(loss, grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when the unscaled gradients hold inf/nan
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        tokens = sum(int((b.segment_ids > 0).sum()) for b in batches)
        self.state.step += 1
        self.state.tokens += tokens
        self.state.elapsed_s += seconds
        record = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "epoch": round(self.plan.epoch_of(last), 4), "tokens": self.state.tokens,
                  "tokens_per_s": tokens / max(seconds, 1e-9), "elapsed_s": round(self.state.elapsed_s, 3)}
        memory = gpu_memory_gib()
        if memory is not None:
            record["gpu_mem_gib"] = round(memory, 3)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Token-weighted mean loss and perplexity over the validation batches (None without validation data)."""
        if not self.val_batches:
            return None
        self.model.eval()
        total, targets = 0.0, 0
        for batch in self.val_batches:
            batch = batch.to(self.device)
            total += causal_lm_loss_sum(self.model(**model_inputs(batch)), batch.labels).item()
            targets += batch.num_targets()
        loss = total / max(targets, 1)
        return {"step": self.state.step, "eval_loss": loss, "eval_ppl": perplexity(loss)}

    def _diverged(self, loss: float, grad_norm: float) -> TrainingFailed:
        return TrainingFailed(f"training diverged at step {self.state.step + 1}: loss {loss:.4g}, gradient norm "
                              f"{grad_norm:.4g}; stopped before the update; {self._kept()}; lower --lr (now "
                              f"{self.config.lr:g}) or --max-grad-norm (now {self.config.max_grad_norm:g}) and start "
                              f"again")

    def _kept(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was saved"
        return f"the last complete checkpoint is {self.last_checkpoint}"

    def writing(self, what: str, then: str | None = None) -> AbstractContextManager[None]:
        """Context manager: a failed write of ``what`` into the run directory becomes one TrainingFailed line ending
        with ``then``, by default what was kept and the ``--resume`` that continues from it."""
        if then is None:
            go_on = (f"continue with --resume {self.last_checkpoint}" if self.last_checkpoint is not None else
                     "start the run again")
            then = f"{self._kept()}; free space and {go_on}"
        return reporting_write(what, self.run_dir, then)

    def checkpoint(self) -> Path:
        state = {"config": self.config.to_dict(), "tokens": self.state.tokens, "elapsed_s": self.state.elapsed_s,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng_state(),
                 "data_order": self.plan.data_order}
        with self.writing(f"checkpoint-{self.state.step}"):
            self.last_checkpoint = save_checkpoint(self.run_dir, self.state.step, self.save_adapter, state)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.last_checkpoint)
        return self.last_checkpoint

    def _write_metrics(self, metrics: MetricsLog, record: dict[str, Any]) -> None:
        with self.writing(METRICS_FILE):
            metrics.write(record)

    # --------------------------------------------------------------------------------------------------- run
    def run(self, metrics: MetricsLog) -> dict[str, Any]:
        """Train to ``total_steps`` or until a stop request; returns a summary."""
        self.progress = Progress(self.total_steps, self.state.step, self.config.progress)
        first_step, first_loss, last_loss = self.state.step + 1, None, None
        last_eval, interval = None, self.config.eval_interval()
        previous = self._install_sigint()
        try:
            while self.state.step < self.total_steps and not self.stop_requested:
                record = self.train_step()
                first_loss = record["loss"] if first_loss is None else first_loss
                last_loss = record["loss"]
                step = record["step"]
                if step % self.config.logging_steps == 0 or step == self.total_steps:
                    self._write_metrics(metrics, record)
                self.progress.update(record)
                if self.on_step is not None:
                    self.on_step(self, record)
                if (interval and step % interval == 0) or step == self.total_steps:
                    last_eval = self.evaluate()
                    if last_eval is not None:
                        self._write_metrics(metrics, last_eval)
                        self.progress.write(f"step {step}: eval loss {last_eval['eval_loss']:.4f}, "
                                             f"perplexity {last_eval['eval_ppl']:.2f}")
                periodic = self.config.save_steps and step % self.config.save_steps == 0
                if periodic or self.stop_requested or step == self.total_steps:
                    self.checkpoint()
        finally:
            self.progress.close()
            self._restore_sigint(previous)
        return {"steps": self.state.step, "total_steps": self.total_steps, "first_step": first_step,
                "first_loss": first_loss,
                "last_loss": last_loss, "eval": last_eval, "tokens": self.state.tokens,
                "train_seconds": round(self.state.elapsed_s, 2),
                "tokens_per_s": self.state.tokens / max(self.state.elapsed_s, 1e-9),
                "interrupted": self.state.step < self.total_steps,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def _install_sigint(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            self.request_stop()
            self.progress.write("Ctrl-C: saving a checkpoint after this step (press again to abort now)")
            signal.signal(signal.SIGINT, signal.default_int_handler)

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
