"""Checkpoint files, fuzz audit: what an interrupted save leaves behind, and which directory a resume picks."""

import os
import random

import pytest
import torch

from nf4lora.trainer.checkpoint import list_checkpoints, load_state, resolve_checkpoint, save_checkpoint

STATE = {"config": {}, "tokens": 0, "elapsed_s": 0.0, "optimizer": {}, "scheduler": {}, "scaler": None, "rng": {}}


def write_adapter(directory):
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (directory / "adapter_config.json").write_text("{}", encoding="utf-8")


def save(run, step, tag):
    return save_checkpoint(run, step, write_adapter, {**STATE, "tag": tag})


def test_a_checkpoint_a_crash_left_moved_aside_comes_back_at_the_next_save(tmp_path):
    """Re-saving a step moves the old copy to .checkpoint-<n>.old.tmp before renaming the new one in; a crash between
    the two renames leaves only that copy, which the next save used to delete with the stale temp dirs."""
    steps = sorted(random.sample(range(1, 10_000), 3))
    save(tmp_path, steps[0], "older")
    save(tmp_path, steps[1], "aside")
    os.replace(tmp_path / f"checkpoint-{steps[1]}", tmp_path / f".checkpoint-{steps[1]}.old.tmp")
    save(tmp_path, steps[2], "next")
    assert load_state(tmp_path / f"checkpoint-{steps[1]}")["tag"] == "aside"
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{step}" for step in steps]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"checkpoint-{step}" for step in steps)


def test_a_moved_aside_copy_whose_step_was_saved_again_goes(tmp_path):
    step = random.randrange(1, 10_000)
    save(tmp_path, step, "old")
    (tmp_path / f".checkpoint-{step}.old.tmp").mkdir()
    save(tmp_path, step + 1, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{step}", f"checkpoint-{step + 1}"]


@pytest.mark.parametrize("make", [lambda p: p.write_text("x"), lambda p: p.symlink_to(p.parent / "nowhere")])
def test_a_file_or_link_named_like_a_temp_checkpoint_does_not_stop_every_save(tmp_path, make):
    make(tmp_path / f".checkpoint-{random.randrange(10_000)}.tmp")  # was NotADirectoryError from shutil.rmtree
    path = save(tmp_path, 3, "saved")
    assert load_state(path)["tag"] == "saved" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_the_latest_checkpoint_is_the_highest_step_among_the_names_a_save_writes(tmp_path):
    # one step of each length from 1 to 7 digits, so no two are equal, saved in a random order
    steps = random.sample([random.randrange(10 ** (digits - 1), 10 ** digits) for digits in range(1, 8)], 7)
    for step in steps:
        save(tmp_path, step, str(step))
    # stray entries that hold a trainer state: none is a name save_checkpoint writes
    high = str(max(steps) + 1)
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in high)  # \d matched these, and int() read them as `high`
    for name in (f"checkpoint-{fullwidth}", f"checkpoint-0{high}", f"checkpoint-{high}.tmp", "checkpoint-abc",
                 f".checkpoint-{high}.tmp", f"checkpoint-{high} ", f"checkpoint--{high}", f"checkpoint-+{high}",
                 f"checkpoint-{high}\n", f".checkpoint-{high}\n.old.tmp"):
        (tmp_path / name).mkdir()
        torch.save({**STATE, "step": int(high)}, tmp_path / name / "trainer_state.pt")
    (tmp_path / f"checkpoint-{int(high) + 1}").write_text("a file")
    for name in ("...old.tmp", "....old.tmp"):  # moved-aside names of no checkpoint ("." and ".."): skipped, not raised on
        (tmp_path / name).write_text("a file")
    assert list_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{step}" for step in sorted(steps)]
    assert resolve_checkpoint(tmp_path) == tmp_path / f"checkpoint-{max(steps)}"


class Interrupted(Exception):
    pass


def test_a_save_interrupted_at_any_write_rename_or_flush_leaves_the_previous_checkpoint_the_latest(tmp_path,
                                                                                                     monkeypatch):
    rng = random.Random()
    for case in range(12):
        run = tmp_path / str(case)
        first, second = sorted(rng.sample(range(1, 10_000), 2))
        save(run, first, "first")
        target = rng.choice([first, second])
        fail_at, calls = rng.randint(1, 10), [0]
        with monkeypatch.context() as patch:
            for module, name in ((os, "replace"), (os, "fsync"), (torch, "save")):
                real = getattr(module, name)

                def failing(*args, real=real, **kwargs):
                    calls[0] += 1
                    if calls[0] == fail_at:
                        raise Interrupted
                    return real(*args, **kwargs)

                patch.setattr(module, name, failing)
            try:
                save(run, target, "second")
                interrupted = False
            except Interrupted:
                interrupted = True
        # whole whichever it is (a flush after the last rename may fail with the new one in place)
        tag = load_state(resolve_checkpoint(run))["tag"]
        assert tag in (("first", "second") if interrupted else ("second",)), (case, fail_at)
        save(run, 10_000, "third")
        assert load_state(run / f"checkpoint-{first}")["tag"] in ("first", "second")
        assert {p.name for p in run.iterdir()} <= {f"checkpoint-{first}", f"checkpoint-{second}", "checkpoint-10000"}
