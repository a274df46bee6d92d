"""Atomic checkpoints: everything needed to continue a run exactly, written to a temp dir and renamed.

Layout of ``<run>/checkpoint-<step>/``:
- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter in peft's format;
- ``trainer_state.pt``: step, data position (micro-batches consumed), optimizer and scheduler state dicts,
  the Python / NumPy / torch CPU / CUDA RNG states, token and time counters, and the resolved config;
- ``manifest.json``: ``{"format": 1, "files": {name: {"bytes": int, "sha256": hex}}}`` for every other file,
  written last, so that a resume refuses a file truncated, bit-flipped or lost after the save, naming it, instead
  of training on from garbage (a flip inside tensor data unpickles without complaint). The check reads each file
  once more (SHA-256 hashed 0.5 GB/s on a busy 2-core CPU host); ``sha256sum`` verifies a file by hand.

A checkpoint directory only ever appears complete: it is written as ``.checkpoint-<step>.tmp``, flushed to disk,
then renamed with ``os.replace`` (atomic on POSIX within one file system), and the run directory is flushed so
that the rename is on disk too. A crash mid-write leaves a ``.tmp`` directory that is ignored and cleaned up by the
next save, which also brings back a checkpoint that a crash left moved aside while re-saving its step (as a resume
does before it picks the latest checkpoint). A resume checks the manifest first, then reads ``trainer_state.pt`` with
``torch.load(weights_only=True)``: tensors, plain Python values and NumPy's RNG array only, so a checkpoint from
elsewhere cannot run code.

A checkpoint without a manifest is one written before manifests existed, and still resumes: refusing it would strand
every run started before an upgrade, and it still gets the weights-only load and the checks on every key and
shape. One that was written with a manifest says so in its state (the ``manifest`` key), so losing the manifest
later (an incomplete copy) is refused rather than read as an old checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import torch

from nf4lora.files import publish_directory, replaced_final, restore_replaced
from nf4lora.jsonfile import read_json_object

from .config import RESUME_KEYS, TrainConfig, UsageError

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# what a resume reads from STATE_FILE (the loop's ``checkpoint`` writes them; "scaler" is None without fp16)
STATE_KEYS = ("config", "step", "tokens", "elapsed_s", "optimizer", "scheduler", "scaler", "rng")
# what a resume needs of the LambdaLR state in STATE_FILE: the step it has reached and the lrs it scales
SCHEDULER_KEYS = ("last_epoch", "base_lrs", "_last_lr", "lr_lambdas")
# Settings a resume takes from the checkpoint whatever the config says, and where they come back from: a new value
# would be silently ignored, so it is refused like a change to RESUME_KEYS.
RESTORED_KEYS = {"lr": "optimizer and scheduler state", "weight_decay": "optimizer state",
                 "lora_dropout": "adapter_config.json"}
# the names save_checkpoint writes, and only those: ASCII digits without leading zeros ("\d" takes "１２" as 12),
# nothing after them (\Z: $ also matches before a trailing newline)
_NAME = re.compile(r"^checkpoint-(0|[1-9][0-9]*)\Z")
_TEMP = re.compile(r"^\.checkpoint-[0-9]+\.tmp\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """What unpickling the NumPy RNG state's uint32 array needs. Its constructor is registered under both module
    paths, ``numpy.core`` (NumPy 1.x) and ``numpy._core`` (2.x), so a checkpoint resumes across an upgrade."""
    try:
        import numpy as np
    except ImportError:
        return []
    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    return [(reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")] + [
        np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved. CUDA streams are restored for the devices this process sees; those of
    devices it lacks (a checkpoint from a host with more GPUs) are skipped, as a different device set replays a
    different run anyway."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(run_dir: str | Path, step: int, write_adapter: Callable[[Path], None],
                    state: dict[str, Any]) -> Path:
    """Write ``<run_dir>/checkpoint-<step>`` atomically, its manifest last; ``write_adapter(dir)`` saves the
    peft-format adapter. A save that fails (a full disk) removes its partial copy, which would hold the space the
    next attempt needs, and re-raises."""
    run_dir = Path(run_dir)
    _recover_interrupted_saves(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    tmp.mkdir(parents=True)
    try:
        write_adapter(tmp)
        torch.save({**state, "step": step, "manifest": MANIFEST_FILE}, tmp / STATE_FILE)
        write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, final)
    return final


def _recover_interrupted_saves(run_dir: Path) -> None:
    """Clear what a save stopped by a crash left in ``run_dir``: its temp copy goes, and a checkpoint it had moved
    aside to replace (``.checkpoint-<step>.old.tmp``, whole) comes back unless the new one took its place."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if not _TEMP.match(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:  # a file or link of that name would make every save fail
            path.unlink()
    _restore_moved_aside(run_dir)


def _restore_moved_aside(run_dir: Path) -> None:
    """Bring back every checkpoint of ``run_dir`` that a crashed re-save left moved aside (``restore_replaced``)."""
    for checkpoint in _checkpoint_dirs(run_dir):
        restore_replaced(checkpoint)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory`` (a checkpoint is flat) in MANIFEST_FILE."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.iterdir()) if path.is_file() and path.name != MANIFEST_FILE}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [path for path in _checkpoint_dirs(Path(run_dir)) if (path / STATE_FILE).is_file()]


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` paths of ``run_dir`` by step, those that exist or were moved aside to be replaced."""
    names = {(replaced_final(path) or path).name for path in run_dir.iterdir()} if run_dir.is_dir() else set()
    steps = {int(m.group(1)): name for name in names if (m := _NAME.match(name))}
    return [run_dir / steps[step] for step in sorted(steps)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint inside a run directory. A checkpoint that a crashed re-save
    left moved aside comes back first, as the next save would bring it back: otherwise a run directory resumes from
    the checkpoint before it."""
    path = Path(path)
    if _NAME.match(path.name):
        restore_replaced(path)
    if (path / STATE_FILE).is_file():
        return path
    _restore_moved_aside(path)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise UsageError(f"--resume {path}: no {STATE_FILE} there and no checkpoint-<step> directories; point it "
                         f"at a checkpoint or at a run directory that has one")
    return checkpoints[-1]


@dataclass(frozen=True)
class Resume:
    """A checkpoint to resume from, read and verified once (:func:`read_resume`): the CLI takes the run's saved
    config from ``state`` and the job everything else, without reading and hashing the files a second time."""

    checkpoint: Path
    state: dict[str, Any]


def read_resume(path: str | Path) -> Resume:
    """The checkpoint that ``--resume path`` names (:func:`resolve_checkpoint`) with its verified state
    (:func:`load_state`)."""
    checkpoint = resolve_checkpoint(path)
    return Resume(checkpoint, load_state(checkpoint))


def _load_failure(exc: Exception) -> str:
    """Why a checkpoint file could not be read, in one line. A weights-only refusal of ``torch.load`` names what it
    refused rather than repeating torch's advice to load the file unsafely."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if refused:
        return f"it holds a pickled {refused.group(1)}, and a resume loads only tensors and plain values"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _refuse(checkpoint: Path, problem: str) -> UsageError:
    return UsageError(f"--resume {checkpoint}: {problem}; use another checkpoint")


def _read_manifest(checkpoint: Path) -> dict[str, dict[str, Any]] | None:
    """The ``files`` table of the checkpoint's manifest, validated; None for a checkpoint from before manifests."""
    path = checkpoint / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = read_json_object(path)
    except (OSError, ValueError) as exc:
        raise _refuse(checkpoint, f"{MANIFEST_FILE} is not a checkpoint manifest ({_load_failure(exc)})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise _refuse(checkpoint, f"{MANIFEST_FILE} is not a checkpoint manifest (expected a JSON object with "
                                  f"\"format\": {MANIFEST_FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise _refuse(checkpoint, f"{MANIFEST_FILE} is not a checkpoint manifest (expected \"files\" to list "
                                  f"{STATE_FILE})")
    for name, entry in files.items():
        problem = _manifest_entry_problem(name, entry)
        if problem:
            raise _refuse(checkpoint, f"{MANIFEST_FILE} is not a checkpoint manifest ({problem})")
    return files


def _manifest_entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with one ``files`` entry, or None."""
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        return f"entry {name!r} is not a file name inside the checkpoint"
    valid = (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0 and
             isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]))
    if not valid:
        return f"entry {name!r} is {entry!r}, expected {{\"bytes\": <int >= 0>, \"sha256\": <64 hex digits>}}"
    return None


def _check_file(checkpoint: Path, name: str, entry: dict[str, Any]) -> None:
    """Refuse ``checkpoint/name`` unless it has the size and SHA-256 the manifest recorded."""
    path = checkpoint / name
    if not path.is_file():
        raise _refuse(checkpoint, f"{name} is missing, though {MANIFEST_FILE} lists it")
    try:
        size = path.stat().st_size
        digest = _sha256(path) if size == entry["bytes"] else None
    except OSError as exc:
        raise _refuse(checkpoint, f"unreadable {name} ({_load_failure(exc)})") from None
    if size != entry["bytes"]:
        raise _refuse(checkpoint, f"{name} is {size} bytes but {MANIFEST_FILE} recorded {entry['bytes']}")
    if digest != entry["sha256"]:
        raise _refuse(checkpoint, f"{name} does not match the SHA-256 {MANIFEST_FILE} recorded")


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors on the CPU), once every file of the checkpoint, the adapter
    included, matches its manifest."""
    files = _read_manifest(checkpoint)
    for name, entry in (files or {}).items():
        _check_file(checkpoint, name, entry)
    state = _load_state_file(checkpoint)
    if files is None and "manifest" in state:
        raise _refuse(checkpoint, f"{MANIFEST_FILE} is missing, though {STATE_FILE} was saved with one (an "
                                  f"incomplete copy?)")
    return state


def _load_state_file(checkpoint: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when resumed; NumPy's RNG state is the one
        # non-tensor array in it
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged pickle fails in whatever way its broken byte leads to (KeyError, ...)
        raise _refuse(checkpoint, f"unreadable {STATE_FILE} ({_load_failure(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise _refuse(checkpoint, f"{STATE_FILE} is not an nf4lora trainer state")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise _refuse(checkpoint, f"{STATE_FILE} lacks {', '.join(missing)}")
    return state


def check_resumable(checkpoint: Path, state: dict[str, Any]) -> None:
    """Refuse a trainer state whose counters, schedule position or RNG streams a resume could not restore (a
    ``trainer_state.pt`` edited or written elsewhere, which its manifest cannot tell from a good one), before anything
    is loaded or written: training on would crash mid-run or silently replay the wrong steps."""
    problem = _counters_problem(state) or _scheduler_problem(state) or _rng_problem(state["rng"])
    if problem:
        raise _refuse(checkpoint, f"{STATE_FILE} {problem}")


def _counters_problem(state: dict[str, Any]) -> str | None:
    for key, kinds, expected in (("step", int, "an integer"), ("tokens", int, "an integer"),
                                 ("elapsed_s", (int, float), "a finite number")):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < math.inf:
            return f"holds {key}={value!r}, expected {expected} >= 0"
    return None


def _scheduler_problem(state: dict[str, Any]) -> str | None:
    scheduler = state["scheduler"]
    if not isinstance(scheduler, dict) or any(key not in scheduler for key in SCHEDULER_KEYS):
        return f"holds no learning-rate schedule (expected a dict with {', '.join(SCHEDULER_KEYS)})"
    if type(scheduler["last_epoch"]) is not int or scheduler["last_epoch"] != state["step"]:
        return f"holds a schedule at step {scheduler['last_epoch']!r} for step {state['step']}"
    return None


def _rng_problem(rng: Any) -> str | None:
    """Why ``rng`` cannot be restored, found by restoring it and then the current streams."""
    current = rng_state()
    try:
        set_rng_state(rng)
    except Exception as exc:  # whatever a malformed state makes random / torch raise
        return f"holds RNG states that cannot be restored ({_load_failure(exc)})"
    finally:
        set_rng_state(current)
    return None


def restore_training_state(checkpoint: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LambdaLR,
                           scaler: torch.amp.GradScaler | None) -> None:
    """Load the optimizer, schedule and (fp16) loss-scaler states of ``state`` into this run's; one that does not fit
    them is refused by name. The lr of the next step comes from this run's schedule: the run's length (--max-steps,
    --epochs) may change on resume, and the checkpoint's last lr belongs to the old length's schedule (where a linear
    or cosine decay ends at 0)."""
    loaders: dict[str, Callable[[Any], None]] = {"optimizer": optimizer.load_state_dict,
                                                 "scheduler": lambda saved: _load_schedule(scheduler, saved)}
    if scaler is not None and state["scaler"] is not None:
        loaders["scaler"] = scaler.load_state_dict
    for key, load in loaders.items():
        try:
            load(state[key])
        except Exception as exc:  # a state_dict of the wrong shape fails in whatever way it breaks the loader
            raise _refuse(checkpoint, f"{STATE_FILE}'s {key} state does not fit this run "
                                      f"({_load_failure(exc)})") from None


def _load_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    scheduler.load_state_dict(saved)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                        strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports; LambdaLR has no public setter


def check_compatible(config: TrainConfig, state: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when a setting that shapes the trainable state or the data order has changed, or one that
    the checkpoint restores over the config (RESTORED_KEYS)."""
    saved = state["config"]
    for key in (*RESUME_KEYS, *RESTORED_KEYS):
        if key in saved and saved[key] != getattr(config, key):
            raise UsageError(f"--resume {checkpoint}: {_conflict(key, saved[key], getattr(config, key))}; drop the "
                             f"flag or start a new run")


def _conflict(key: str, saved: Any, new: Any) -> str:
    if key in RESTORED_KEYS:
        return (f"the checkpoint restores {key}={saved!r} from its {RESTORED_KEYS[key]}, so {key}={new!r} would be "
                f"ignored")
    return f"incompatible checkpoint, it was trained with {key}={saved!r} but this run has {key}={new!r}"
