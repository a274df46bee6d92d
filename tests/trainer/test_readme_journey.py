"""A new user's path through the README: what `--help` says, and the errors of the commands it shows."""

import json
import re

import pytest

import nf4lora.model
from nf4lora.trainer.cli import main
from nf4lora.trainer.config import DEMO_DEFAULTS


def test_train_help_states_the_settings_of_the_no_flag_demo(capsys):
    """`python train.py` with no flags runs with DEMO_DEFAULTS, not the per-flag defaults the help lists."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, value in DEMO_DEFAULTS.items():
        assert f"--{name.replace('_', '-')} {value}" in text, name


def test_train_help_states_each_default_once(capsys):
    """A flag whose help says what its None default means (--model, --data, ...) gets no "(default: None)" after it."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag_help in re.split(r" --(?=[a-z])", text):
        assert flag_help.count("(default:") <= 1, flag_help


@pytest.mark.parametrize("argv,pattern", [
    (["train", "--optimizer", "adamw"], r"^nf4lora train: error: argument --optimizer: invalid choice: 'adamw' "
                                        r"\(choose from 'paged-adamw-32bit', .*\); see nf4lora train --help$"),
    (["generate", "--model", "m"], r"^nf4lora generate: error: one of the arguments --prompt --prompts-file is "
                                   r"required; see nf4lora generate --help$"),
], ids=["typo", "missing"])
def test_argparse_errors_are_one_line_naming_the_valid_values(capsys, argv, pattern):
    """README: bad input stops the run with a single line (argparse printed its 25-line usage first)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and re.search(pattern, err), err


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_missing_adapter_is_named_before_the_model_loads(capsys, tmp_path, command):
    """Generating before training: --adapter runs/X does not exist yet. The model directory does not exist either,
    so the adapter's own message proves it was checked first (a 7B takes minutes to load)."""
    argv = [command, "--model", str(tmp_path / "nope"), "--adapter", str(tmp_path / "runs" / "X")]
    argv += ["--prompt", "x"] if command == "generate" else ["--out", str(tmp_path / "merged")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"--adapter .*X: no adapter_config.json there", err), err


def test_a_missing_model_directory_says_what_to_pass(capsys, tmp_path):
    assert main(["inspect", "--model", str(tmp_path / "runs" / "X" / "base_model")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"base_model does not exist; pass a Hugging Face model directory \(config.json", err), err


class Loaded(Exception):
    """Raised by the stand-in load_model once it has recorded its arguments."""


@pytest.fixture
def load_calls(monkeypatch):
    calls = []

    def record(path, **kwargs):
        calls.append(kwargs)
        raise Loaded

    monkeypatch.setattr(nf4lora.model, "load_model", record)
    return calls


def fp4_run(tmp_path):
    """A run directory as `nf4lora train --quantization fp4 --blocksize 128 --no-double-quant` leaves it."""
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    for directory in (run, run / "checkpoint-3"):
        (directory / "adapter_config.json").write_text("{}")
    (run / "run_config.json").write_text(json.dumps({"quantization": "fp4", "blocksize": 128,
                                                     "double_quant": False, "template": "{prompt}"}))
    return run


@pytest.mark.parametrize("adapter", ["run", "run/checkpoint-3"])
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_the_base_is_loaded_in_the_format_the_adapter_was_trained_on(tmp_path, load_calls, command, adapter):
    """merge must fold the adapter into the base as it was trained (README), and generate run it there."""
    fp4_run(tmp_path)
    argv = [command, "--model", str(tmp_path), "--adapter", str(tmp_path / adapter)]
    argv += ["--prompt", "x"] if command == "generate" else ["--out", str(tmp_path / "merged")]
    with pytest.raises(Loaded):
        main(argv)
    assert {k: load_calls[0][k] for k in ("quantization", "blocksize", "double_quant")} == {
        "quantization": "fp4", "blocksize": 128, "double_quant": False}


def test_explicit_format_flags_win_over_the_run_and_defaults_apply_without_one(tmp_path, load_calls):
    run = fp4_run(tmp_path)
    with pytest.raises(Loaded):
        main(["generate", "--model", str(tmp_path), "--adapter", str(run), "--prompt", "x",
              "--quantization", "nf4", "--blocksize", "64", "--double-quant"])
    with pytest.raises(Loaded):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    expected = {"quantization": "nf4", "blocksize": 64, "double_quant": True}
    for call in load_calls:
        assert {k: call[k] for k in expected} == expected
