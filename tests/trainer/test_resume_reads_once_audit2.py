"""A resume reads and verifies its checkpoint once: the CLI takes the saved config from the state it loaded and hands
that state to the job, which used to read and hash every file of the checkpoint a second time."""

import dataclasses
import shutil
from collections import Counter

import pytest

import nf4lora.trainer.checkpoint as checkpoint_module
from nf4lora.trainer.checkpoint import MANIFEST_FILE
from nf4lora.trainer.cli import main
from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.job import run_train


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, tiny_model_dir, data_file):
    """(config, run directory) of a finished one-step run; tests resume a copy of it."""
    run = tmp_path_factory.mktemp("one_step") / "run"
    config = TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=1,
                         micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32")
    run_train(config, log=lambda _: None)
    return config, run


def count_reads(monkeypatch):
    """(Counter of files hashed, list of checkpoints whose trainer_state.pt was loaded), filled as they happen."""
    hashed, loaded = Counter(), []
    sha256, load_state_file = checkpoint_module._sha256, checkpoint_module._load_state_file
    monkeypatch.setattr(checkpoint_module, "_sha256", lambda path: hashed.update([path]) or sha256(path))
    monkeypatch.setattr(checkpoint_module, "_load_state_file",
                        lambda checkpoint: loaded.append(checkpoint) or load_state_file(checkpoint))
    return hashed, loaded


def assert_read_once(checkpoint, hashed, loaded):
    listed = [p for p in checkpoint.iterdir() if p.name != MANIFEST_FILE]
    assert {path: n for path, n in hashed.items() if path.parent == checkpoint} == {path: 1 for path in listed}
    assert loaded == [checkpoint]


def test_a_cli_resume_hashes_and_loads_each_checkpoint_file_once(monkeypatch, tmp_path, one_step):
    config, trained = one_step
    run = shutil.copytree(trained, tmp_path / "run")
    hashed, loaded = count_reads(monkeypatch)
    assert main(["train", "--model", config.model, "--data", config.data, "--micro-batch", "2", "--max-len", "192",
                 "--no-progress", "--max-new-tokens", "0", "--dtype", "fp32", "--max-steps", "2",
                 "--resume", str(run)]) == 0
    assert_read_once(run / "checkpoint-1", hashed, loaded)
    assert (run / "checkpoint-2").is_dir()


def test_run_train_without_a_loaded_checkpoint_reads_it_once_too(monkeypatch, tmp_path, one_step):
    config, trained = one_step
    run = shutil.copytree(trained, tmp_path / "run")
    hashed, loaded = count_reads(monkeypatch)
    run_train(dataclasses.replace(config, output_dir=None, max_steps=2, resume=str(run)), log=lambda _: None)
    assert_read_once(run / "checkpoint-1", hashed, loaded)
