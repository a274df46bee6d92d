"""Checkpoint integrity (the manifest), resume compatibility and RNG round trips: claims an audit found broken."""

import hashlib
import io
import json
import random
import struct
import zipfile

import numpy as np
import pytest
import torch

from nf4lora.trainer.checkpoint import (MANIFEST_FILE, STATE_FILE, check_compatible, load_state, resolve_checkpoint,
                                        rng_state, save_checkpoint, set_rng_state)
from nf4lora.trainer.config import TrainConfig, UsageError

ADAPTER = {"adapter_config.json": b'{"r": 16, "lora_alpha": 32}', "adapter_model.safetensors": bytes(range(256)) * 8}
# an optimizer tensor whose bytes are easy to find in trainer_state.pt (a flip there unpickles without complaint)
MARKED = torch.arange(1000, 1064, dtype=torch.float32)


def write_adapter(directory):
    for name, data in ADAPTER.items():
        (directory / name).write_bytes(data)


def full_state():
    return {"config": TrainConfig().to_dict(), "tokens": 7, "elapsed_s": 1.5,
            "optimizer": {"state": {0: {"exp_avg": MARKED.clone()}}, "param_groups": []}, "scheduler": {},
            "scaler": None, "rng": rng_state()}


def assert_refused_in_one_line(checkpoint, pattern):
    """load_state refuses ``checkpoint`` with a one-line UsageError matching ``pattern``."""
    with pytest.raises(UsageError, match=pattern) as exc:
        load_state(checkpoint)
    assert len(str(exc.value).splitlines()) == 1


def flip_a_bit(path):
    """Flip one bit in the middle of a file: in trainer_state.pt, inside the marked tensor's data."""
    data = bytearray(path.read_bytes())
    marked = data.find(MARKED.numpy().tobytes())
    assert path.name != STATE_FILE or marked > 0
    data[marked + 17 if path.name == STATE_FILE else len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-3])


def delete(path):
    path.unlink()


@pytest.mark.parametrize("name", [STATE_FILE, *ADAPTER])
@pytest.mark.parametrize("damage, problem", [
    (flip_a_bit, r"does not match the SHA-256 manifest.json recorded"),
    (truncate, r"is \d+ bytes but manifest.json recorded \d+"),
    (delete, r"is missing, though manifest.json lists it"),
], ids=["bit-flip", "truncated", "deleted"])
def test_a_damaged_checkpoint_file_is_refused_in_one_line_naming_it(tmp_path, name, damage, problem):
    """A single flipped bit, a cut tail or a lost file in any part of a checkpoint is caught before anything is
    loaded from it. A flip inside tensor data unpickles silently and a damaged adapter was never looked at, so
    without the manifest both resumed from garbage."""
    checkpoint = save_checkpoint(tmp_path / "run ü 1", 3, write_adapter, full_state())
    assert torch.equal(load_state(checkpoint)["optimizer"]["state"][0]["exp_avg"], MARKED)
    damage(checkpoint / name)
    assert_refused_in_one_line(checkpoint, rf"^--resume .*run ü 1/checkpoint-3: {name} {problem}; use another "
                                           rf"checkpoint$")


def test_the_manifest_records_the_size_and_sha256_of_every_checkpoint_file(tmp_path):
    checkpoint = save_checkpoint(tmp_path, 2, write_adapter, full_state())
    files = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {STATE_FILE, *ADAPTER}
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def _rewrite_manifest(edit):
    def damage(checkpoint):
        path = checkpoint / MANIFEST_FILE
        path.write_text(edit(path.read_text()))
    return damage


def _edit_files(edit):
    return _rewrite_manifest(lambda text: json.dumps({**json.loads(text), "files": edit(json.loads(text)["files"])}))


@pytest.mark.parametrize("damage", [
    _rewrite_manifest(lambda text: text[:len(text) // 2]),
    _rewrite_manifest(lambda text: "[]"),
    _rewrite_manifest(lambda text: json.dumps({**json.loads(text), "format": 2})),
    lambda checkpoint: (checkpoint / MANIFEST_FILE).write_bytes(b"\xff\x00"),
    _edit_files(lambda files: {k: v for k, v in files.items() if k != STATE_FILE}),
    _edit_files(lambda files: {**files, STATE_FILE: {"bytes": "12", "sha256": files[STATE_FILE]["sha256"]}}),
    _edit_files(lambda files: {**files, STATE_FILE: {**files[STATE_FILE], "sha256": "xyz"}}),
    _edit_files(lambda files: {**files, "../run_config.json": files[STATE_FILE]}),
    _edit_files(lambda files: {**files, "/etc/hostname": files[STATE_FILE]}),
], ids=["truncated-json", "a-list", "format-2", "not-json", "no-state-entry", "size-not-int", "bad-digest",
        "parent-path", "absolute-path"])
def test_a_malformed_manifest_is_refused_in_one_line_naming_it(tmp_path, damage):
    checkpoint = save_checkpoint(tmp_path, 3, write_adapter, full_state())
    damage(checkpoint)
    assert_refused_in_one_line(checkpoint, r"^--resume .*checkpoint-3: manifest.json is not a checkpoint manifest "
                                           r"\(.+\); use another checkpoint$")


def test_a_checkpoint_that_lost_its_manifest_is_refused(tmp_path):
    """A checkpoint written with a manifest and found without one (an incomplete copy) is not trusted."""
    checkpoint = save_checkpoint(tmp_path, 3, write_adapter, full_state())
    (checkpoint / MANIFEST_FILE).unlink()
    with pytest.raises(UsageError, match=r"checkpoint-3: manifest.json is missing, though trainer_state.pt was saved "
                                         r"with one"):
        load_state(checkpoint)


def make_legacy(checkpoint):
    """Turn a checkpoint into one written before manifests existed: no manifest, no marker in its state."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    state.pop("manifest", None)
    torch.save(state, checkpoint / STATE_FILE)
    (checkpoint / MANIFEST_FILE).unlink(missing_ok=True)
    return checkpoint


def test_a_checkpoint_written_before_manifests_still_resumes(tmp_path):
    checkpoint = make_legacy(save_checkpoint(tmp_path, 5, write_adapter, full_state()))
    assert resolve_checkpoint(tmp_path) == checkpoint and load_state(checkpoint)["step"] == 5


def edit_pickle(path, edit):
    """Rewrite the pickle inside a torch file in place: ``edit(pickled)`` may be shorter and is padded with STOP
    opcodes, which the unpickler never reaches, so every zip offset stays valid (torch checks no CRC)."""
    data = path.read_bytes()
    archive = zipfile.ZipFile(io.BytesIO(data))
    info = archive.getinfo(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    edited = edit(data[start:start + info.file_size])
    assert len(edited) <= info.file_size
    path.write_bytes(data[:start] + edited.ljust(info.file_size, b".") + data[start + info.file_size:])


@pytest.mark.parametrize("pickled", [b"\x80\x02h\x05.", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.",
                                     b"\x80\x02K\x01K\x02s."],
                         ids=["memo-miss-KeyError", "rebuild-without-args-TypeError", "setitem-on-int-IndexError"])
def test_a_legacy_state_file_that_breaks_the_unpickler_in_any_way_is_a_usage_error(tmp_path, pickled):
    """Without a manifest only the unpickler notices damage, and it fails with whatever exception the broken bytes
    lead to (flipping single bits gave IndexError, KeyError, TypeError, struct.error and AssertionError besides the
    RuntimeError and UnpicklingError that were caught)."""
    checkpoint = make_legacy(save_checkpoint(tmp_path, 3, write_adapter, full_state()))
    edit_pickle(checkpoint / STATE_FILE, lambda original: pickled)
    with pytest.raises(UsageError, match=r"checkpoint-3: unreadable trainer_state.pt \((Key|Type|Index)Error"):
        load_state(checkpoint)


# ----------------------------------------------------------------------------------- resume compatibility

# lr and weight_decay come back with the optimizer's param groups and the scheduler's base_lrs, lora_dropout with
# the adapter's adapter_config.json: a new value for any of them was silently ignored on resume.
RESTORED = {"lr": 1e-3, "weight_decay": 0.1, "lora_dropout": 0.2}


@pytest.mark.parametrize("key", list(RESTORED))
def test_resume_refuses_a_setting_the_checkpoint_would_silently_override(tmp_path, key):
    saved = {"config": TrainConfig().to_dict()}
    with pytest.raises(UsageError, match=rf"--resume .*: the checkpoint restores {key}={TrainConfig().to_dict()[key]!r}"
                                         rf" from its .+, so {key}={RESTORED[key]!r} would be ignored; drop the flag "
                                         rf"or start a new run"):
        check_compatible(TrainConfig(**{key: RESTORED[key]}), saved, tmp_path)


def test_the_optimizer_and_scheduler_states_bring_back_the_saved_lr_and_weight_decay():
    """Why ``lr`` and ``weight_decay`` are refused rather than allowed: the trainer's optimizer, built with the new
    values, takes the old ones back from the checkpoint's state dicts."""
    from nf4lora.trainer.job import make_optimizer
    from nf4lora.trainer.loop import lr_lambda

    def optimizer_and_schedule(config, params):
        optimizer = make_optimizer(config, params)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, 10))

    params = [torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.ones(4)
    old, old_schedule = optimizer_and_schedule(TrainConfig(lr=1.0, weight_decay=0.5, optimizer="adamw-32bit"), params)
    old.step(), old_schedule.step()
    new, new_schedule = optimizer_and_schedule(TrainConfig(lr=0.01, weight_decay=0.0, optimizer="adamw-32bit"), params)
    new.load_state_dict(old.state_dict()), new_schedule.load_state_dict(old_schedule.state_dict())
    new.step(), new_schedule.step()
    assert (new.param_groups[0]["lr"], new.param_groups[0]["weight_decay"]) == (1.0, 0.5)


# ------------------------------------------------------------------------------------------------- RNG

def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_every_rng_stream_replays_after_a_checkpoint_round_trip(tmp_path):
    checkpoint = save_checkpoint(tmp_path, 1, write_adapter, full_state())
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(load_state(checkpoint)["rng"])
    assert draws() == expected


def test_a_numpy_rng_state_pickled_by_numpy_1_loads_under_numpy_2(tmp_path):
    """NumPy 2 moved ``numpy.core`` to ``numpy._core``; a checkpoint from before an upgrade must still resume, not
    be refused as if it held foreign code."""
    if not hasattr(np, "_core") or np.__version__.startswith("1."):
        pytest.skip("needs NumPy 2")
    saved = full_state()
    checkpoint = make_legacy(save_checkpoint(tmp_path, 1, write_adapter, saved))
    edit_pickle(checkpoint / STATE_FILE, lambda pickled: pickled.replace(b"cnumpy._core.multiarray\n",
                                                                          b"cnumpy.core.multiarray\n"))
    numpy_state = load_state(checkpoint)["rng"]["numpy"]
    assert np.array_equal(numpy_state[1], saved["rng"]["numpy"][1]) and numpy_state[2:] == saved["rng"]["numpy"][2:]


def test_cuda_rng_states_of_devices_this_host_lacks_are_skipped(monkeypatch):
    """A checkpoint from a host with 4 visible GPUs resumed where only 1 is visible restores device 0's stream;
    restoring the others raised deep inside torch (no such device)."""
    restored = {}

    def set_cuda_rng(state, device):
        if device >= 1:
            raise IndexError("tuple index out of range")  # what torch.cuda.default_generators[device] raises
        restored[device] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_cuda_rng)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_cuda_rng)
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": states})
    assert list(restored) == [0] and torch.equal(restored[0], states[0])


def test_resuming_a_run_whose_adapter_took_a_bit_flip_is_one_line_exit_2_and_changes_nothing(capsys, tmp_path,
                                                                                             tiny_model_dir, data_file):
    """End to end through ``nf4lora train --resume <run>``: the flip lies in LoRA weights, which load without
    complaint, so without the manifest the run went on training from a corrupted adapter."""
    from nf4lora.trainer.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--max-steps", "1",
                 "--micro-batch", "2", "--max-len", "192", "--no-progress", "--max-new-tokens", "0", "--dtype",
                 "fp32", "--output-dir", str(run)]) == 0
    flip_a_bit(run / "checkpoint-1" / "adapter_model.safetensors")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("checkpoint-1: adapter_model.safetensors does not match the "
                                                       "SHA-256 manifest.json recorded; use another checkpoint"), err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("name", [STATE_FILE, "adapter_model.safetensors"])
def test_a_checkpoint_file_this_user_may_not_read_is_refused_in_one_line(tmp_path, monkeypatch, name):
    """A checkpoint written by another user on a shared cluster: a PermissionError, not a traceback."""
    checkpoint = save_checkpoint(tmp_path, 3, write_adapter, full_state())
    real_open = type(checkpoint).open

    def denied(path, *args, **kwargs):
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(type(checkpoint), "open", denied)
    with pytest.raises(UsageError, match=rf"checkpoint-3: unreadable {name} \(PermissionError: .*Permission denied"):
        load_state(checkpoint)
