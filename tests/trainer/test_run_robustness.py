"""``nf4lora train`` under bad input and a hostile file system: checks that run before the slow work, unwritable and
full disks, run files replaced atomically, non-finite values in the logs, and ``--model`` pointed at a run."""

import dataclasses
import errno
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import nf4lora.lora.adapters as adapters
from nf4lora.trainer import job, loop
from nf4lora.trainer.checkpoint import load_state
from nf4lora.trainer.cli import main
from nf4lora.trainer.config import UsageError
from nf4lora.trainer.job import prepare, run_train
from nf4lora.trainer.metrics import MetricsLog, read_metrics


def quiet(_):
    pass


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code, err, exit_code=2):
    assert code == exit_code and len(err.splitlines()) == 1 and err.startswith("nf4lora train: error: "), (code, err)


def must_not_run(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran before the check that should have stopped the run")
    return refuse


@pytest.fixture
def fast_flags(tiny_model_dir, data_file):
    return ["--model", tiny_model_dir, "--data", data_file, "--max-steps", "1", "--micro-batch", "2", "--max-len",
            "192", "--no-progress", "--max-new-tokens", "0", "--dtype", "fp32"]


# ------------------------------------------------------------------------------------ checks before slow work

def test_device_cuda_without_cuda_is_refused_before_the_data_the_tokenizer_or_the_base(tiny_config, tmp_path,
                                                                                        monkeypatch):
    """A missing data file would be reported first if the data were read first; the demo would train its tokenizer
    and build its base first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(job, "write_default_base", must_not_run("building the demo base"))
    message = "--device cuda but no CUDA device is visible; use --device cpu or auto"
    with pytest.raises(UsageError, match=message):
        prepare(dataclasses.replace(tiny_config, device="cuda", data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(UsageError, match=message):
        prepare(dataclasses.replace(tiny_config, device="cuda", model=None, data=None))


def test_a_missing_model_is_refused_before_the_data_with_the_model_loaders_own_message(capsys, tmp_path,
                                                                                         fast_flags):
    """One text for a missing model directory, whichever command meets it first."""
    from nf4lora.model.checkpoint import resolve_model_dir

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as loader:
        resolve_model_dir(str(missing))
    code, err = run_cli(capsys, "train", *fast_flags, "--model", missing, "--data", tmp_path / "missing.jsonl",
                        "--output-dir", tmp_path / "out")
    assert (code, err) == (2, f"nf4lora train: error: {loader.value}")


def make_run(tmp_path, generated):
    """The files that make a directory an nf4lora run (a default job's holds its generated base_model/)."""
    run = tmp_path / "runs" / "X"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "trainer_state.pt").write_bytes(b"")
    (run / "run_config.json").write_text(json.dumps({"resolved_model": "/models/llama-2-7b"}))
    if generated:
        (run / "base_model").mkdir()
        (run / "base_model" / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize("generated", [True, False], ids=["default-job", "own-model"])
@pytest.mark.parametrize("inside", ["", "checkpoint-3"], ids=["run", "checkpoint"])
def test_model_pointing_at_a_run_says_so_and_names_the_base_it_trained_on(capsys, tmp_path, fast_flags, generated,
                                                                          inside):
    """It complained that the run directory has no tokenizer, after reading the data."""
    run = make_run(tmp_path, generated)
    base = run / "base_model" if generated else "/models/llama-2-7b"
    code, err = run_cli(capsys, "train", *fast_flags, "--model", run / inside, "--data", tmp_path / "missing.jsonl",
                        "--output-dir", tmp_path / "out")
    assert_one_line(code, err)
    what = "an nf4lora run directory" if not inside else f"a checkpoint of the nf4lora run {run}"
    assert err.endswith(f"--model {run / inside} is {what}, not a base model; pass the base model it trained: "
                        f"--model {base}"), err


def test_resuming_a_run_that_has_reached_its_last_step_is_refused_before_the_base_loads(tiny_config, monkeypatch):
    """It loaded the base, trained nothing, rewrote the final adapter and reported success (with --max-steps below
    the checkpoint's step: "steps 2 of 1", not interrupted)."""
    config = dataclasses.replace(tiny_config, max_steps=2, max_new_tokens=0)
    run_train(config, log=quiet)
    monkeypatch.setattr(job, "load_base", must_not_run("loading the base"))
    for max_steps in (2, 1):
        with pytest.raises(UsageError, match=rf"^--resume .*checkpoint-2: the checkpoint is at step 2 and this run "
                                             rf"ends at step {max_steps}; raise --max-steps \(now {max_steps}\) to "
                                             rf"train further$"):
            prepare(dataclasses.replace(config, max_steps=max_steps, resume=config.output_dir))


# --------------------------------------------------------------------------------- unwritable and full disks

def deny(monkeypatch, method, target):
    """Make ``Path.<method>`` on ``target`` fail as it does for a user without the permission."""
    real = getattr(Path, method)

    def denied(path, *args, **kwargs):
        if path == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)


def test_a_data_file_this_user_may_not_read_is_one_line_exit_2(capsys, tmp_path, fast_flags, data_file, monkeypatch):
    """A file of another user on a shared cluster (simulated: root reads anything). It was a traceback."""
    deny(monkeypatch, "open", data_file)  # what read_text and read_bytes go through
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", tmp_path / "out")
    assert_one_line(code, err)
    assert err.endswith(f"Permission denied: '{data_file}'") and not (tmp_path / "out").exists(), err


def test_an_unwritable_output_parent_is_refused_before_the_data_is_read(capsys, tmp_path, fast_flags, monkeypatch):
    """Root writes anywhere, so the read-only directory is simulated: os.access answers as it would for a user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        not (mode & os.W_OK) if Path(path) == locked else real(path, mode, **kwargs)))
    code, err = run_cli(capsys, "train", *fast_flags, "--data", tmp_path / "missing.jsonl", "--output-dir",
                        locked / "run")
    assert_one_line(code, err)
    assert re.search(r"--output-dir .*locked/run: .*locked is not writable; choose another --output-dir", err), err
    assert list(locked.iterdir()) == []




def fail_write(monkeypatch, name, error):
    """Writes of files whose name contains ``name`` raise ``error`` (as a full disk or a read-only mount would)."""
    for method in ("write_text", "write_bytes"):
        real = getattr(Path, method)

        def write(path, data, *args, _real=real, **kwargs):
            if name in path.name:
                raise error
            return _real(path, data, *args, **kwargs)

        monkeypatch.setattr(Path, method, write)


@pytest.mark.parametrize("failure", ["mkdir", "run_config"])
def test_a_run_directory_that_cannot_be_written_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch,
                                                                               failure):
    """The early check passes (os.access is not the last word: ACLs, quotas, a full disk), then creating the run
    directory or writing its run_config.json fails: one line naming the path, and neither the run directory, the
    parents made for it nor the demo's generated base are left behind."""
    run = tmp_path / "nested" / "run"
    if failure == "mkdir":
        deny(monkeypatch, "mkdir", run)
    else:
        fail_write(monkeypatch, "run_config.json", OSError(errno.ENOSPC, "No space left on device"))
    code, err = run_cli(capsys, "train", "--output-dir", run, "--max-steps", "1", "--no-progress",
                        "--max-new-tokens", "0")
    assert_one_line(code, err)
    assert re.search(r"--output-dir .*nested/run: cannot write .*\((Permission denied|No space left on device)\); "
                     r"choose another --output-dir", err), err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_default_job_leaves_no_parent_directories_of_its_output_dir(capsys, tmp_path):
    """The demo made the parents of --output-dir for its generated base before its checks had passed."""
    code, err = run_cli(capsys, "train", "--output-dir", tmp_path / "a" / "b" / "out", "--target-modules", "qq_proj",
                        "--max-steps", "1", "--no-progress")
    assert_one_line(code, err)
    assert list(tmp_path.iterdir()) == []


def fail_second_call(monkeypatch, writer):
    """The second checkpoint (or metrics line) fails as each writer fails on a full disk. Measured on a full tmpfs:
    torch.save raises RuntimeError, safetensors a SafetensorError, plain file writes OSError."""
    owner, name, error = {
        "torch.save": (torch, "save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 "
                                                   "vs 534")),
        "safetensors": (adapters, "save_file", SafetensorError("Error while serializing: I/O error: No space left "
                                                               "on device (os error 28)")),
        "metrics": (MetricsLog, "write", OSError(errno.ENOSPC, "No space left on device")),
    }[writer]
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


@pytest.mark.parametrize("writer, what", [("torch.save", "checkpoint-2"), ("safetensors", "checkpoint-2"),
                                          ("metrics", "metrics.jsonl")])
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tiny_config, monkeypatch, writer,
                                                                                 what):
    config = dataclasses.replace(tiny_config, max_steps=3, save_steps=1, max_new_tokens=0)
    run = Path(config.output_dir)
    fail_second_call(monkeypatch, writer)
    with pytest.raises(RuntimeError, match=rf"^could not write {what} in .*run \(.+; \d+ MiB free there\); the last "
                                           rf"complete checkpoint is (.*checkpoint-1); free space and continue "
                                           rf"with --resume \1$") as exc:
        run_train(config, log=quiet)
    assert len(str(exc.value).splitlines()) == 1
    assert load_state(run / "checkpoint-1")["step"] == 1  # every file still matches its manifest
    assert not (run / "checkpoint-2").exists()


def test_a_full_disk_at_the_final_adapter_names_the_checkpoint_that_holds_it(tiny_config, monkeypatch):
    config = dataclasses.replace(tiny_config, max_steps=1, max_new_tokens=0)
    run = Path(config.output_dir)
    fail_second_call(monkeypatch, "safetensors")  # the first is checkpoint-1's
    with pytest.raises(RuntimeError, match=r"^could not write the final adapter in .*run \(.+\); training finished "
                                           r"and .*checkpoint-1 holds the final adapter$"):
        run_train(config, log=quiet)
    assert load_state(run / "checkpoint-1")["step"] == 1
    assert not (run / "adapter_model.safetensors").exists() and not list(run.glob(".adapter-*"))


def test_after_a_full_disk_the_cli_exits_1_in_one_line_and_the_run_resumes(capsys, tmp_path, fast_flags):
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        fail_second_call(patch, "torch.save")
        code, err = run_cli(capsys, "train", *fast_flags, "--max-steps", "3", "--save-steps", "1", "--output-dir",
                            run)
    assert_one_line(code, err, exit_code=1)
    assert run_cli(capsys, "train", "--resume", run, "--no-progress")[0] == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert not list(run.glob(".checkpoint-*"))


# ------------------------------------------------------------------------------------------- atomic run files

class Crash(BaseException):
    """The process dying mid-write (BaseException: nothing in the trainer may catch it)."""


def crash_half_written(monkeypatch, name):
    """Writing a file whose name contains ``name`` leaves its first half and dies."""
    if name.endswith(".safetensors"):
        real = adapters.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if ".checkpoint-" in str(filename):
                return real(tensors, filename, *args, **kwargs)
            real(tensors, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise Crash(filename)

        monkeypatch.setattr(adapters, "save_file", save_file)
        return
    for method in ("write_text", "write_bytes"):
        real_write = getattr(Path, method)

        def write(path, data, *args, _real=real_write, **kwargs):
            if name not in path.name:
                return _real(path, data, *args, **kwargs)
            _real(path, data[:len(data) // 2], *args, **kwargs)
            raise Crash(path)

        monkeypatch.setattr(Path, method, write)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "summary.json", "run_config.json"])
def test_a_crash_while_a_resume_rewrites_a_run_file_leaves_the_previous_version_whole(tiny_config, monkeypatch,
                                                                                     name):
    """The final adapter, summary.json and run_config.json were rewritten in place: a crash mid-write left half a
    file where a whole one had been."""
    config = dataclasses.replace(tiny_config, max_steps=1, max_new_tokens=0)
    run_train(config, log=quiet)
    run = Path(config.output_dir)
    before = (run / name).read_bytes()
    crash_half_written(monkeypatch, name)
    with pytest.raises(Crash):
        run_train(dataclasses.replace(config, max_steps=2, resume=config.output_dir), log=quiet)
    assert (run / name).read_bytes() == before


# ------------------------------------------------------------------------------------------ non-finite values

def strict_json(line):
    """Parse as jq and JavaScript do: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    log.close()
    assert strict_json((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": None,
                                                                     "lr": 1e-3}


def test_read_metrics_reads_the_nan_and_infinity_of_older_files_as_null(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "grad_norm": Infinity, "lr": -Infinity}\n'
                                            '{"step": 1, "eval_loss": 2.5}\n')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None, "lr": None},
                                      {"step": 1, "eval_loss": 2.5}]


def test_a_non_finite_eval_loss_is_null_in_metrics_and_summary(tiny_config, monkeypatch):
    """An fp16 evaluation can overflow; the run is fine, and both files stay strict JSON."""
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self: {"step": self.state.step, "eval_loss": math.inf,
                                                                "eval_ppl": math.inf})
    config = dataclasses.replace(tiny_config, max_steps=1, max_new_tokens=0)
    run_train(config, log=quiet)
    run = Path(config.output_dir)
    evals = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert evals == [{"step": 1, "eval_loss": None, "eval_ppl": None}]
    assert strict_json((run / "summary.json").read_text())["eval"]["eval_loss"] is None


def test_a_non_finite_loss_stops_the_run_before_the_update_and_keeps_the_last_checkpoint(tiny_config, monkeypatch):
    """It trained on: NaN gradients made every LoRA weight NaN, every later loss NaN, and the run wrote NaN
    checkpoints and a NaN final adapter, and exited 0."""
    poisoned = {"on": False}
    real = loop.causal_lm_loss_sum
    monkeypatch.setattr(loop, "causal_lm_loss_sum",
                        lambda logits, labels: real(logits, labels) * (math.nan if poisoned["on"] else 1.0))

    def poison_after_step_2(trainer, record):
        poisoned["on"] = poisoned["on"] or record["step"] == 2

    config = dataclasses.replace(tiny_config, max_steps=5, save_steps=1, max_new_tokens=0)
    with pytest.raises(RuntimeError, match=r"^training diverged at step 3: loss nan, gradient norm nan; stopped "
                                           r"before the update; the last complete checkpoint is .*checkpoint-2; lower "
                                           r"--lr \(now 0.005\) or --max-grad-norm \(now 0.3\) and start again$"):
        run_train(config, on_step=poison_after_step_2, log=quiet)
    run = Path(config.output_dir)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoint-2/adapter_model.safetensors")).values())
