"""Nothing is lost when a write fails part way: a full disk (or Ctrl-C) at any one of the primitive calls a save
makes leaves the previous version whole, never a mix of old and new files that a reader takes for a good one."""

import errno
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import nf4lora.files as files
from nf4lora.files import publish_directory
from nf4lora.model.checkpoint import write_checkpoint
from nf4lora.trainer.checkpoint import save_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "lora"))
from lora_helpers import perturb_trainables, tiny_llama  # noqa: E402


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _fail_at(k, real, exc):
    """``real`` wrapped to raise ``exc`` at its k-th call (1-based)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise exc
        return real(*args, **kwargs)
    return wrapped


def _directory(path, content):
    path.mkdir()
    (path / "weights").write_bytes(content)
    return path


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "injected"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_a_failed_swap_puts_the_old_directory_back(monkeypatch, tmp_path, exc):
    """The old directory was moved aside and the new one's rename failed: `final` was gone, the old one left under
    `.<name>.old.tmp`, where the next publish did not look for it either."""
    final = _directory(tmp_path / "checkpoint", os.urandom(64))
    before = _tree(final)
    monkeypatch.setattr(files.os, "replace", _fail_at(2, os.replace, exc))
    with pytest.raises(type(exc)):
        publish_directory(_directory(tmp_path / ".checkpoint.tmp", os.urandom(64)), final)
    assert _tree(final) == before
    monkeypatch.undo()
    new = _directory(tmp_path / ".checkpoint.tmp2", b"new")
    publish_directory(new, final)
    assert _tree(final) == {"weights": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.tmp",
                                                                                                  "checkpoint"]


def test_a_crash_between_the_renames_leaves_nothing_behind_the_next_publish(tmp_path):
    """A kill after the old directory was moved aside (no `final`): the next publish left `.<name>.old.tmp` for
    good."""
    _directory(tmp_path / ".checkpoint.old.tmp", b"old")
    publish_directory(_directory(tmp_path / ".checkpoint.tmp", b"new"), tmp_path / "checkpoint")
    assert _tree(tmp_path / "checkpoint") == {"weights": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def _tensors(rng, count):
    return {f"layers.{i}.weight": torch.randn(rng.randint(1, 24), generator=torch.Generator().manual_seed(
        rng.randrange(1 << 30))) for i in range(count)}


@pytest.mark.parametrize("old_shard,new_shard", [(None, None), (32, 32), (None, 32), (32, None)])
def test_a_full_disk_while_saving_a_model_leaves_the_old_one(monkeypatch, tmp_path, old_shard, new_shard):
    """Each file replaced its old version as soon as it was written: a full disk at the second shard (or at
    config.json) left new shards beside old ones and an old config, loading as a model that never existed."""
    import safetensors.torch

    rng = random.Random()
    out = tmp_path / "model"
    old = _tensors(rng, 4)
    write_checkpoint(str(out), old, {"model": "old"}, old_shard)
    before = _tree(out)
    new = _tensors(rng, 4)
    failures = 0
    for target, real in ((safetensors.torch, safetensors.torch.save_file), (Path, Path.write_bytes)):
        name = "save_file" if target is safetensors.torch else "write_bytes"
        for k in range(1, 8):
            with monkeypatch.context() as patch:
                patch.setattr(target, name, _fail_at(k, real, OSError(errno.ENOSPC, "No space left on device")))
                try:
                    write_checkpoint(str(out), new, {"model": "new"}, new_shard)
                except OSError:
                    failures += 1
                    assert _tree(out) == before, (name, k)
                    continue
            write_checkpoint(str(out), old, {"model": "old"}, old_shard)  # every call succeeded: the old one back
            break
    assert failures >= 2
    write_checkpoint(str(out), new, {"model": "new"}, new_shard)
    reference = tmp_path / "reference"
    write_checkpoint(str(reference), new, {"model": "new"}, new_shard)
    assert _tree(out) == _tree(reference)


def test_a_full_disk_while_saving_an_adapter_leaves_the_old_one(monkeypatch, tmp_path):
    """The weights were renamed into place before adapter_config.json was written: a full disk then left the new
    weights beside the old config (another lora_alpha: a silently wrong scaling on load)."""
    from nf4lora.lora import LoraConfig, inject_lora, save_adapter

    alpha = random.randint(3, 64)
    save_adapter(inject_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj"],
                                                      init_lora_weights=False)), tmp_path)
    before = _tree(tmp_path)
    model = inject_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=alpha + 1, target_modules=["q_proj"],
                                                 init_lora_weights=False))
    perturb_trainables(model, seed=random.randrange(1 << 30))
    monkeypatch.setattr(Path, "write_bytes", _fail_at(1, Path.write_bytes, OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="No space"):
        save_adapter(model, tmp_path)
    assert _tree(tmp_path) == before


def test_a_failed_resave_of_a_checkpoint_keeps_the_old_one(monkeypatch, tmp_path):
    """A checkpoint saved again at its step (a resumed run) whose final rename fails keeps the one it replaces."""
    def write_adapter(directory):
        (directory / "adapter_model.safetensors").write_bytes(os.urandom(32))

    final = save_checkpoint(tmp_path, 3, write_adapter, {"tokens": 1})
    before = _tree(final)
    monkeypatch.setattr(files.os, "replace", _fail_at(2, os.replace, OSError(errno.EIO, "injected")))
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, 3, write_adapter, {"tokens": 2})
    assert _tree(final) == before
    monkeypatch.undo()
    assert save_checkpoint(tmp_path, 3, write_adapter, {"tokens": 2}) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
