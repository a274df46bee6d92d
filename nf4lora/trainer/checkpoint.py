"""Atomic checkpoints: everything needed to continue a run exactly, written to a temp dir and renamed.

Layout of ``<run>/checkpoint-<step>/``:
- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter in peft's format;
- ``trainer_state.pt``: step, data position (micro-batches consumed), optimizer and scheduler state dicts,
  the Python / NumPy / torch CPU / CUDA RNG states, token and time counters, and the resolved config.

A checkpoint directory only ever appears complete: it is written as ``.checkpoint-<step>.tmp``, flushed to disk,
then renamed with ``os.replace`` (atomic on POSIX within one file system), and the run directory is flushed so
that the rename is on disk too. A crash mid-write leaves a ``.tmp`` directory that is ignored and cleaned up by the
next save. A resume reads ``trainer_state.pt`` with ``torch.load(weights_only=True)``: tensors, plain Python values
and NumPy's RNG array only, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RESUME_KEYS, TrainConfig, UsageError

STATE_FILE = "trainer_state.pt"
# what a resume reads from STATE_FILE (the loop's ``checkpoint`` writes them; "scaler" is None without fp16)
STATE_KEYS = ("config", "step", "tokens", "elapsed_s", "optimizer", "scheduler", "scaler", "rng")
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG the training step can draw from (dropout, data order, sampling)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_array_globals() -> list:
    """What unpickling the NumPy RNG state's uint32 array needs (NumPy 1.x and 2.x name its module differently)."""
    try:
        import numpy as np
    except ImportError:
        return []
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")) + [path]:
        _fsync(item, os.O_RDONLY | (os.O_DIRECTORY if item.is_dir() else 0))


def save_checkpoint(run_dir: str | Path, step: int, write_adapter: Callable[[Path], None],
                    state: dict[str, Any]) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically; ``write_adapter(dir)`` saves the peft-format adapter."""
    run_dir = Path(run_dir)
    for stale in run_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    tmp.mkdir(parents=True)
    write_adapter(tmp)
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    publish_directory(tmp, final)
    return final


def publish_directory(tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` appear as ``final`` in one rename: flushed to disk first, replacing a
    ``final`` already there (re-saving a step, ``--overwrite``) only once the new one is whole, and the parent then
    flushed, since the rename itself survives a power cut only once the directory entry is on disk."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and
             (p / STATE_FILE).is_file()] if run_dir.is_dir() else []
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint inside a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UsageError(f"--resume {path}: no {STATE_FILE} there and no checkpoint-<step> directories; point it "
                         f"at a checkpoint or at a run directory that has one")
    return checkpoints[-1]


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in one line. A weights-only refusal names what it refused rather than
    repeating torch's advice to load the file unsafely."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return f"it holds a pickled {refused.group(1)}, and a resume loads only tensors and plain values"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors on the CPU)."""
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when resumed; NumPy's RNG state is the one
        # non-tensor array in it
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--resume {checkpoint}: unreadable {STATE_FILE} ({_load_failure(exc)}); use another "
                         f"checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UsageError(f"--resume {checkpoint}: {STATE_FILE} is not an nf4lora trainer state")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UsageError(f"--resume {checkpoint}: {STATE_FILE} lacks {', '.join(missing)}; use another checkpoint")
    return state


def check_compatible(config: TrainConfig, state: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when a setting that shapes the trainable state or the data order has changed."""
    saved = state["config"]
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(config, key):
            raise UsageError(f"--resume {checkpoint}: incompatible checkpoint, it was trained with {key}="
                             f"{saved[key]!r} but this run has {key}={getattr(config, key)!r}; drop the flag or "
                             f"start a new run")
