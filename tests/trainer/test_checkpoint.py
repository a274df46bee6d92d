import io
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from nf4lora.trainer.checkpoint import (MANIFEST_FILE, STATE_FILE, check_compatible, list_checkpoints, load_state,
                                        resolve_checkpoint, rng_state, save_checkpoint, set_rng_state, write_manifest)
from nf4lora.trainer.config import TrainConfig, UsageError


# the smallest state `load_state` accepts: every key a resume reads
STATE = {"config": {}, "tokens": 0, "elapsed_s": 0.0, "optimizer": {}, "scheduler": {}, "scaler": None, "rng": {}}


def write_adapter(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"weights")


def test_checkpoint_appears_complete_or_not_at_all(tmp_path):
    def failing(directory):
        (directory / "partial").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, failing, dict(STATE))
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoint-3").exists()
    # removed at once: on a full disk the partial copy would hold the space the next save needs
    assert not list(tmp_path.glob(".checkpoint-*"))
    path = save_checkpoint(tmp_path, 3, write_adapter, dict(STATE))
    assert path == tmp_path / "checkpoint-3" and (path / STATE_FILE).is_file()
    assert not list(tmp_path.glob(".checkpoint-*"))  # the failed attempt's temp dir was cleaned up


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, write_adapter, {**STATE, "tag": "old"})
    save_checkpoint(tmp_path, 2, write_adapter, {**STATE, "tag": "new"})
    assert load_state(tmp_path / "checkpoint-2")["tag"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_resolve_picks_the_latest_numerically(tmp_path):
    for step in (2, 10, 9):
        save_checkpoint(tmp_path, step, write_adapter, dict(STATE))
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint(tmp_path / "checkpoint-9") == tmp_path / "checkpoint-9"
    with pytest.raises(UsageError, match="no trainer_state.pt there and no checkpoint-<step> directories"):
        resolve_checkpoint(tmp_path / "checkpoint-9" / "missing")


def test_rng_state_round_trip_replays_every_stream():
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_corrupt_state_file_is_a_usage_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, write_adapter, dict(STATE))
    (path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="trainer_state.pt is 16 bytes but manifest.json recorded"):
        load_state(path)
    write_manifest(path)  # the same bytes as written by a broken or foreign writer: the unpickler refuses them
    with pytest.raises(UsageError, match="unreadable trainer_state.pt"):
        load_state(path)


def test_compatibility_names_the_changed_setting(tmp_path):
    saved = {"config": TrainConfig(lora_r=8).to_dict()}
    check_compatible(TrainConfig(lora_r=8, max_steps=99), saved, tmp_path)  # the run length may change on resume
    with pytest.raises(UsageError, match="trained with target_modules='all-linear' but this run has "
                                         "target_modules='q_proj'"):
        check_compatible(TrainConfig(lora_r=8, target_modules="q_proj"), saved, tmp_path)


# ------------------------------------------------------------------------------- crashes mid-save (fault injection)

ADAPTER_FILES = {"adapter_config.json": b'{"r": 16}' * 20, "adapter_model.safetensors": bytes(range(256)) * 40}


class Crash(BaseException):
    """Stands in for the process dying at one point of a save (BaseException: nothing may catch it)."""


def write_adapter_files(directory):
    for name, data in ADAPTER_FILES.items():
        (directory / name).write_bytes(data)


def is_complete(checkpoint, step):
    return (load_state(checkpoint)["step"] == step and
            all((checkpoint / name).read_bytes() == data for name, data in ADAPTER_FILES.items()))


def crash_at(monkeypatch, k):
    """Make the k-th file-system operation of a save die, leaving what a killed process would: half of the file
    being written, the first file of a tree being deleted, or nothing at all before an fsync or a rename."""
    count = {"n": 0}

    def due():
        count["n"] += 1
        return count["n"] == k

    def half_written(path, data):
        if due():
            path.write_bytes(data[:len(data) // 2])
            raise Crash(f"write {path.name}")
        path.write_bytes(data)

    def adapter(directory):
        for name, data in ADAPTER_FILES.items():
            half_written(directory / name, data)

    real_save, real_fsync, real_replace, real_rmtree = torch.save, os.fsync, os.replace, shutil.rmtree

    def save(obj, path):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half_written(path, buffer.getvalue())

    def fsync(fd):
        if due():
            raise Crash("fsync")
        real_fsync(fd)

    def replace(src, dst):
        if due():
            raise Crash(f"rename {src} -> {dst}")
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if due():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files:
                files[0].unlink()
            raise Crash(f"rmtree {path}")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return adapter


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step-again"])
def test_a_crash_at_any_point_of_a_save_never_leaves_a_half_written_checkpoint_to_resume(tmp_path, monkeypatch,
                                                                                        resave):
    """Kill the save of checkpoint-4 at every file-system operation in turn (half-written files, a half-deleted
    tree, a missing fsync or rename). Whatever ``--resume <run>`` would then pick must be complete, checkpoint-2
    must survive, and the next save must succeed and leave no temp directories."""
    k = 0
    while True:  # k-th operation dies; stop after the first save that had fewer operations than k
        k += 1
        run = tmp_path / f"k{k}"
        save_checkpoint(run, 2, write_adapter_files, dict(STATE))
        if resave:
            save_checkpoint(run, 4, write_adapter_files, dict(STATE))
        (run / ".checkpoint-3.tmp").mkdir()  # a stale leftover of an earlier crash
        (run / ".checkpoint-3.tmp" / STATE_FILE).write_bytes(b"partial")
        with monkeypatch.context() as patch:
            adapter = crash_at(patch, k)
            try:
                save_checkpoint(run, 4, adapter, dict(STATE))
                crashed = False
            except Crash:
                crashed = True
        picked = resolve_checkpoint(run)
        assert picked.name in ("checkpoint-2", "checkpoint-4") and is_complete(picked, int(picked.name[11:])), k
        assert is_complete(run / "checkpoint-2", 2), k
        save_checkpoint(run, 4, write_adapter_files, dict(STATE))
        assert is_complete(resolve_checkpoint(run), 4) and not list(run.glob(".checkpoint-*")), k
        if not crashed:
            break
    assert k > 8  # every write, fsync, rename and delete of a save was interrupted once


def test_incomplete_checkpoint_directories_are_never_resumed_from(tmp_path):
    """A ``checkpoint-<n>`` without trainer_state.pt (a non-atomic copy) and a ``.checkpoint-<n>.tmp`` that was
    never renamed, even with every file in it, are both ignored: the latest complete checkpoint is picked."""
    save_checkpoint(tmp_path, 2, write_adapter_files, dict(STATE))
    (tmp_path / "checkpoint-6").mkdir()
    write_adapter_files(tmp_path / "checkpoint-6")
    unrenamed = tmp_path / ".checkpoint-8.tmp"
    unrenamed.mkdir()
    write_adapter_files(unrenamed)
    torch.save({"config": {}, "step": 8}, unrenamed / STATE_FILE)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """A list that os.fsync and os.replace append ("fsync", path) / ("rename", destination) to, in call order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to see which file an fsync flushed")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", str(Path(dst).resolve()))),
                                                         real_replace(src, dst))[1])
    return events


def test_checkpoint_files_reach_the_disk_before_the_directory_is_renamed_into_place(tmp_path, monkeypatch):
    """Atomic rename is only crash-safe if the data is durable first: every file of the checkpoint and its
    directory are fsynced before the rename that makes ``checkpoint-<step>`` appear."""
    events = _record_fsyncs_and_renames(monkeypatch)
    final = save_checkpoint(tmp_path, 3, write_adapter_files, dict(STATE)).resolve()
    renamed = events.index(("rename", str(final)))
    synced = {Path(path).name for kind, path in events[:renamed] if kind == "fsync"}
    assert {*ADAPTER_FILES, STATE_FILE, MANIFEST_FILE, ".checkpoint-3.tmp"} <= synced, events


def test_the_rename_is_flushed_to_the_run_directory_after_it_happens(tmp_path, monkeypatch):
    """The rename only survives a power cut once the run directory's entry for it is on disk."""
    events = _record_fsyncs_and_renames(monkeypatch)
    for tag in ("first", "again"):  # a new checkpoint, then the same step saved again (two renames)
        events.clear()
        final = save_checkpoint(tmp_path, 3, write_adapter, {**STATE, "tag": tag}).resolve()
        renamed = events.index(("rename", str(final)))
        assert ("fsync", str(tmp_path.resolve())) in events[renamed + 1:], events


class _RunsCode:
    """Pickles as a call that creates ``marker``: what a hostile trainer_state.pt could do on an unsafe load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_state_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = save_checkpoint(tmp_path, 4, write_adapter, {**STATE, "extra": _RunsCode(marker)})
    with pytest.raises(UsageError, match=r"checkpoint-4: unreadable trainer_state.pt \(it holds a pickled getattr, "
                                         r"and a resume loads only tensors and plain values\)") as exc:
        load_state(path)
    assert not marker.exists() and len(str(exc.value).splitlines()) == 1


def test_a_full_trainer_state_with_every_rng_loads_without_unpickling_code(tmp_path):
    state = {**STATE, "config": TrainConfig().to_dict(), "rng": rng_state(),
             "optimizer": {"state": {0: {"exp_avg": torch.randn(4)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    loaded = load_state(save_checkpoint(tmp_path, 2, write_adapter, state))
    set_rng_state(loaded["rng"])  # NumPy's uint32 key array came back as an array
    assert loaded["step"] == 2 and torch.equal(loaded["optimizer"]["state"][0]["exp_avg"],
                                               state["optimizer"]["state"][0]["exp_avg"])


# ------------------------------------------------------------------------------------ malformed state files

def _truncate(fraction):
    def cut(path):
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)] if fraction < 1 else data[:-10])
    return cut


@pytest.mark.parametrize("damage", [
    _truncate(0.0), _truncate(0.001), _truncate(0.5), _truncate(1),
    lambda path: torch.save([1, 2, 3], path),
    lambda path: torch.save({"step": 3}, path),
    lambda path: torch.save({k: v for k, v in torch.load(path, weights_only=False).items() if k != "optimizer"}, path),
], ids=["empty", "first-bytes", "half", "all-but-10-bytes", "a-list", "no-config", "no-optimizer"])
def test_truncated_or_foreign_state_files_are_refused_with_a_usage_error(tmp_path, damage):
    """A trainer_state.pt cut short anywhere (each cut raises a different exception inside torch.load), or a
    valid torch file that is not a trainer state or lacks a part a resume reads, is a one-line UsageError naming
    the file, never a traceback, even where the manifest agrees with it (written so by a broken or foreign
    writer; the manifest alone refuses damage done after the save)."""
    state = {**STATE, "config": TrainConfig().to_dict(),
             "optimizer": {"state": {i: torch.randn(64, 64) for i in range(8)}}, "rng": rng_state()}
    path = save_checkpoint(tmp_path, 3, write_adapter, state)
    assert load_state(path)["step"] == 3
    damage(path / STATE_FILE)
    write_manifest(path)
    with pytest.raises(UsageError, match=r"--resume .*checkpoint-3: .*trainer_state.pt") as exc:
        load_state(path)
    assert len(str(exc.value).splitlines()) == 1


# ----------------------------------------------------------------------------------- resume compatibility

# What a resumed run may not change: the trainable state's shape or the data order it replays (and the base).
REFUSED = {"model": "other/model", "quantization": "fp4", "blocksize": 128, "double_quant": False, "lora_r": 8,
           "lora_alpha": 8.0, "target_modules": "q_proj", "use_rslora": True, "use_dora": True,
           "optimizer": "adamw-8bit", "micro_batch": 8, "grad_accum": 4, "max_len": 64, "packing": True, "seed": 7,
           "data": "other.jsonl", "val_data": "val.jsonl", "val_fraction": 0.2, "record_format": "text",
           "template": "Q: {prompt}\nA: "}
# What it may: run length, the schedule's shape, clipping, logging, where it runs. (Not the learning rate, weight
# decay or LoRA dropout: the checkpoint restores those, see test_checkpoint_audit.py.)
ALLOWED = {"schedule": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0, "max_steps": 99, "epochs": 3.0,
           "save_steps": 5, "eval_steps": 5, "logging_steps": 2, "progress": False, "max_new_tokens": 0,
           "output_dir": "elsewhere", "device": "cpu", "dtype": "fp32"}


@pytest.mark.parametrize("key", list(REFUSED))
def test_resume_refuses_a_changed_setting_that_shapes_the_state_or_the_data_order(tmp_path, key):
    """Changing any one of these on --resume is refused with a message naming the setting and both values."""
    saved = {"config": TrainConfig(model="base/model", data="train.jsonl").to_dict()}
    changed = TrainConfig(**{"model": "base/model", "data": "train.jsonl", key: REFUSED[key]})
    with pytest.raises(UsageError, match=rf"incompatible checkpoint, it was trained with {key}=.* but this run has "
                                         rf"{key}="):
        check_compatible(changed, saved, tmp_path)


def test_resume_allows_changing_run_length_schedule_logging_and_device(tmp_path):
    """The settings that neither shape the state nor come back with it may change on --resume."""
    saved = {"config": TrainConfig(model="base/model", data="train.jsonl").to_dict()}
    check_compatible(TrainConfig(model="base/model", data="train.jsonl", **ALLOWED), saved, tmp_path)
