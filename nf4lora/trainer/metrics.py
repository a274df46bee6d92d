"""Run reporting: ``metrics.jsonl``, the progress bar, the loss-curve PNG and the end-of-run summary.

``metrics.jsonl`` holds one JSON object per line: training lines carry ``step``, ``loss``, ``lr``, ``grad_norm``,
``epoch``, ``tokens``, ``tokens_per_s``, ``elapsed_s`` (and ``gpu_mem_gib`` on CUDA); evaluation lines carry
``step``, ``eval_loss`` and ``eval_ppl``. ``loss`` is the token-weighted mean over the step's micro-batches, ``lr``
the rate that step used, ``grad_norm`` the norm before clipping, ``tokens`` the running count of non-padding input
tokens (prompts included); ``eval_loss`` is the token-weighted mean over the validation examples and ``eval_ppl``
its exp. A value that is not a finite number (the infinite gradient norm of a step
the fp16 loss scaler skipped, an overflowed eval loss) is written as ``null``, which strict readers (jq, JavaScript)
accept where they refuse Python's ``NaN`` and ``Infinity``. On resume the lines after the checkpoint's step are
dropped, so the file always describes one consistent trajectory; the trimmed file replaces the old one in one
rename, so a kill during a resume never loses the lines it keeps. tqdm and matplotlib are optional extras.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from nf4lora.files import publish_file

from .config import UsageError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Append-only JSON-lines writer, flushed per line so that a killed run keeps its history."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line, step in self._records() if step <= resume_step]
            publish_file(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
        self._file = self.path.open("a", encoding="utf-8")

    def _records(self) -> list[tuple[str, int]]:
        """(line, step) of every record in the file. A last line without its newline is one a killed run was
        writing: it is dropped. Any other line that is not a JSON object with an integer step is refused."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            step = _step_of(line)
            if step is not None:
                records.append((line, step))
            elif number < len(lines):
                raise UsageError(f"{self.path}: line {number} is not a metrics record (a JSON object with an "
                                 f"integer step); repair or delete that line to resume")
        return records

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(strict_dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None when it is not a JSON object with an integer step."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def strict_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with every float that is not finite, at any depth, written as null."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl``. The NaN and Infinity of files written before null replaced them read as
    None too, so old and new runs compare alike."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line, parse_constant=lambda _: None) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def gpu_memory_gib() -> float | None:
    """Peak allocated CUDA memory of this process, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


class Progress:
    """A tqdm bar when tqdm is installed and enabled; otherwise a plain line about every 5% of the run."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.enabled, self._bar = total, enabled, None
        self._every = max(1, total // 20)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        fields = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                  "tok/s": f"{record['tokens_per_s']:.0f}"}
        if record.get("gpu_mem_gib") is not None:
            fields["mem"] = f"{record['gpu_mem_gib']:.2f}GiB"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(1)
        elif self.enabled and (record["step"] % self._every == 0 or record["step"] == self.total):
            print(f"step {record['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()),
                  file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_loss(run_dir: Path) -> Path | None:
    """Write ``loss.png`` (train and eval loss against step); None when matplotlib is not installed. The image is
    rendered in memory and replaces the previous one in one rename (``publish_file``), so a failure leaves that one
    whole."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = run_dir / PLOT_FILE
    publish_file(path, png.getvalue())
    return path


def perplexity(loss: float) -> float:
    """exp(loss); inf past float range (metrics.jsonl writes it as null, like an infinite eval loss)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
