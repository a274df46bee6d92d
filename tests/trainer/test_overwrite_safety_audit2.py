"""--overwrite keeps the old run until the new one holds a checkpoint: a new run that stops before that (an error
or Ctrl-C in setup or in its first steps) leaves the old run byte for byte; one that gets further replaces it."""

import dataclasses
import shutil

import pytest

import nf4lora.trainer.job as job
from nf4lora.trainer.checkpoint import list_checkpoints
from nf4lora.trainer.cli import EXIT_INTERRUPTED, main
from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.job import run_train
from nf4lora.trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, tiny_model_dir, data_file):
    """(config, directory) of a finished one-step run; tests overwrite a copy of it."""
    run = tmp_path_factory.mktemp("old_run") / "run"
    config = TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=1,
                         micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32", lora_r=8)
    run_train(config, log=lambda _: None)
    return config, run


def files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def fail_at_step_1(trainer, record):
    raise RuntimeError("injected failure in step 1")


def test_ctrl_c_in_setup_after_the_run_dir_is_made_leaves_the_old_run(monkeypatch, tmp_path, old_run):
    config, trained = old_run
    run = copy_of(trained, tmp_path)
    before = files(run)

    def interrupted(*args, **kwargs):
        assert (run / "run_config.json").is_file()  # the new run's directory is in place by now
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "eval_batches", interrupted)
    code = main(["train", "--model", config.model, "--data", config.data, "--output-dir", str(run), "--overwrite",
                 "--max-steps", "1", "--micro-batch", "2", "--max-len", "192", "--no-progress", "--max-new-tokens",
                 "0", "--dtype", "fp32"])
    assert code == EXIT_INTERRUPTED
    assert files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failure_before_the_first_checkpoint_leaves_the_old_run(tmp_path, old_run):
    config, trained = old_run
    run = copy_of(trained, tmp_path)
    before = files(run)
    with pytest.raises(RuntimeError, match="injected failure in step 1"):
        run_train(dataclasses.replace(config, output_dir=str(run), overwrite=True, lora_r=4), on_step=fail_at_step_1,
                  log=lambda _: None)
    assert files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_old_run_goes_once_the_new_one_has_a_checkpoint(tmp_path, old_run):
    config, trained = old_run
    run = copy_of(trained, tmp_path)

    def fail_at_step_2(trainer, record):
        if record["step"] == 2:
            raise RuntimeError("injected failure in step 2")

    with pytest.raises(RuntimeError, match="injected failure in step 2"):
        run_train(dataclasses.replace(config, output_dir=str(run), overwrite=True, lora_r=4, save_steps=1,
                                      max_steps=2),
                  on_step=fail_at_step_2, log=lambda _: None)
    # the new run (rank 4) with its checkpoint-1 replaced the old run (rank 8): what --resume continues
    assert list_checkpoints(run) == [run / "checkpoint-1"]
    assert '"lora_r": 4' in (run / "run_config.json").read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_a_finished_overwrite_leaves_only_the_new_run(tmp_path, old_run):
    config, trained = old_run
    run = copy_of(trained, tmp_path)
    run_train(dataclasses.replace(config, output_dir=str(run), overwrite=True, max_steps=2), log=lambda _: None)
    assert list_checkpoints(run) == [run / "checkpoint-2"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_resuming_another_run_into_an_overwritten_one_replaces_it(tmp_path, old_run, tiny_model_dir, data_file):
    """The old run's files used to stay: its checkpoint-1 beside the resumed run's checkpoint-2 and its metrics
    lines in the new run's metrics.jsonl."""
    config, trained = old_run
    run = copy_of(trained, tmp_path)
    other = tmp_path / "other"
    run_train(dataclasses.replace(config, output_dir=str(other), max_steps=1), log=lambda _: None)
    run_train(dataclasses.replace(config, output_dir=str(run), overwrite=True, max_steps=2, resume=str(other)),
              log=lambda _: None)
    assert list_checkpoints(run) == [run / "checkpoint-2"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [2]


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_an_input_inside_the_run_it_would_replace_is_refused_in_one_line(capsys, tmp_path, old_run, flag):
    """--overwrite moves the old run's files aside, so an input among them would vanish from under the new run (the
    end-of-run sample could not reload a --model moved away); it is refused before anything moves."""
    config, trained = old_run
    run = copy_of(trained, tmp_path)
    inputs = {"--model": run / "base", "--data": run / "data" / "clauses.jsonl"}
    shutil.copytree(config.model, inputs["--model"])
    inputs["--data"].parent.mkdir()
    shutil.copyfile(config.data, inputs["--data"])
    before = files(run)
    argv = ["train", "--model", config.model, "--data", config.data, "--output-dir", str(run), "--overwrite",
            "--max-steps", "1", "--micro-batch", "2", "--max-len", "192", "--no-progress", "--max-new-tokens", "0",
            "--dtype", "fp32"]
    argv[argv.index(flag) + 1] = str(inputs[flag])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--output-dir {run} holds the input {inputs[flag]}; choose another directory")
    assert len(err.splitlines()) == 1
    assert files(run) == before
