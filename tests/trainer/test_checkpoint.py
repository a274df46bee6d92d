import random

import pytest
import torch

from nf4lora.trainer.checkpoint import (STATE_FILE, check_compatible, list_checkpoints, load_state, resolve_checkpoint,
                                        rng_state, save_checkpoint, set_rng_state)
from nf4lora.trainer.config import TrainConfig, UsageError


def write_adapter(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"weights")


def test_checkpoint_appears_complete_or_not_at_all(tmp_path):
    def failing(directory):
        (directory / "partial").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, failing, {"config": {}})
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoint-3").exists()
    path = save_checkpoint(tmp_path, 3, write_adapter, {"config": {}})
    assert path == tmp_path / "checkpoint-3" and (path / STATE_FILE).is_file()
    assert not list(tmp_path.glob(".checkpoint-*"))  # the failed attempt's temp dir was cleaned up


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, write_adapter, {"config": {}, "tag": "old"})
    save_checkpoint(tmp_path, 2, write_adapter, {"config": {}, "tag": "new"})
    assert load_state(tmp_path / "checkpoint-2")["tag"] == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_resolve_picks_the_latest_numerically(tmp_path):
    for step in (2, 10, 9):
        save_checkpoint(tmp_path, step, write_adapter, {"config": {}})
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
    path = save_checkpoint(tmp_path, 1, write_adapter, {"config": {}})
    (path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="unreadable trainer_state.pt"):
        load_state(path)


def test_compatibility_names_the_changed_setting(tmp_path):
    saved = {"config": TrainConfig(lora_r=8).to_dict()}
    check_compatible(TrainConfig(lora_r=8, lr=1.0), saved, tmp_path)  # lr may change on resume
    with pytest.raises(UsageError, match="trained with target_modules='all-linear' but this run has "
                                         "target_modules='q_proj'"):
        check_compatible(TrainConfig(lora_r=8, target_modules="q_proj"), saved, tmp_path)
