"""Fuzz audit of the trainer's flags and TOML keys: every bad value is one UsageError line (exit 2, nothing written),
never a traceback, and a config that is accepted survives JSON (run_config.json) unchanged."""

import json
import random
import re
import string
import sys

import pytest

from nf4lora.trainer.cli import build_parser, main
from nf4lora.trainer.config import TrainConfig, UsageError, _fields, _kind, config_from_args
from nf4lora.trainer.job import run_length


@pytest.fixture
def rng():
    return random.Random()


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def random_name(rng, length=6):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def reaching_into_the_prompt(rng):
    """A template field that reads an attribute or an item of the prompt string."""
    attribute, key = random_name(rng), random_name(rng)
    return rng.choice([f"{{prompt.{attribute}}}", f"{{prompt[{key}]}}", "{prompt.upper}", "{prompt.__class__}"])


def test_a_template_that_reaches_into_the_prompt_is_a_usage_error(rng):
    for _ in range(20):
        template = f"{random_name(rng)} {reaching_into_the_prompt(rng)} {rng.choice(['', '{prompt}'])}"
        with pytest.raises(UsageError, match=r"^--template .*\{prompt\} is its only placeholder"):
            TrainConfig(template=template)


def test_train_and_generate_refuse_such_a_template_in_one_line(capsys, rng, tmp_path):
    template = reaching_into_the_prompt(rng)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--template", template, "--output-dir", str(out))
    assert code == 2 and err.startswith("nf4lora train: error: --template") and "\n" not in err
    assert not out.exists()
    code, err = run_cli(capsys, "generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--template", template)
    assert code == 2 and err.startswith("nf4lora generate: error: --template") and "\n" not in err


def not_utf8(rng):
    """Text holding a lone surrogate where a command line had a byte that is not UTF-8."""
    text = random_name(rng)
    at = rng.randrange(len(text) + 1)
    return text[:at] + chr(rng.randrange(0xDC80, 0xDD00)) + text[at:]


@pytest.mark.parametrize("flag", ["--template", "--sample-prompt", "--target-modules"])
def test_text_that_is_not_utf8_is_refused_before_anything_is_written(capsys, rng, tmp_path, flag):
    value = not_utf8(rng) + ("{prompt}" if flag == "--template" else "")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", flag, value, "--output-dir", str(out))
    assert code == 2 and "\n" not in err
    assert err.startswith(f"nf4lora train: error: {flag} ") and "is not UTF-8 text" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--model", "--data", "--val-data", "--output-dir", "--resume"])
def test_an_empty_path_is_refused_by_its_flag(capsys, monkeypatch, tmp_path, flag):
    monkeypatch.chdir(tmp_path)  # an empty --output-dir was taken as runs/<timestamp> here
    code, err = run_cli(capsys, "train", flag, "", "--max-steps", "1")
    assert code == 2 and err == f"nf4lora train: error: {flag} '' is empty; pass a path, or leave the flag out " \
                                f"for its default"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["5", "true", "[\"a\"]", "{x = 1}"])
def test_a_toml_resume_that_is_not_a_string_is_one_line(capsys, tmp_path, value):
    config = tmp_path / "run.toml"
    config.write_text(f"resume = {value}\n")
    code, err = run_cli(capsys, "train", "--config", str(config), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "\n" not in err
    assert err.startswith(f"nf4lora train: error: --config {config}: resume = ") and "should be a string" in err
    assert not (tmp_path / "out").exists()


def test_epochs_too_many_to_count_are_a_usage_error(rng):
    per_epoch = rng.randint(2, 10_000)
    epochs = sys.float_info.max / per_epoch * rng.uniform(1.01, 2.0)
    with pytest.raises(UsageError, match=re.escape(f"--epochs {epochs:g} of {per_epoch} micro-batches each overflows")):
        run_length(TrainConfig(epochs=epochs, max_steps=0), per_epoch)


def test_a_train_run_with_such_epochs_stops_in_one_line(capsys, tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--model", str(tiny_model_dir), "--data", str(data_file), "--epochs",
                        "1e308", "--max-len", "192", "--no-progress", "--output-dir", str(out))
    assert code == 2 and err.startswith("nf4lora train: error: --epochs 1e+308 of ") and "\n" not in err
    assert not out.exists()


def test_output_dir_help_names_the_resume_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--resume, else runs/<timestamp>" in " ".join(help_text.split())


VALUES = ["0", "-1", "1", "3", "64", "1e308", "1e400", "nan", "inf", "-0", "", " ", "1_000", "0.5", "true",
          "{prompt}", "{prompt.x}", "{prompt[x]}", "{prompt!r}", "{}", "\udcff", "\u00e9{prompt}", "q_proj,v_proj",
          "q_proj(", ",", str(2**63), "9" * 40, "nf4", "none", "cosine", "bf16", "cpu", "text"]


def random_argv(rng):
    argv = ["train"]
    for _ in range(rng.randint(1, 6)):
        name = rng.choice(list(_fields()))
        flag = f"--{name.replace('_', '-')}"
        if _kind(name) is bool:
            argv.append(rng.choice([flag, f"--no-{name.replace('_', '-')}"]))
        else:
            argv += [flag, rng.choice(VALUES)]
    return argv


def test_random_flags_resolve_or_are_refused_in_one_line_and_round_trip_through_json(capsys, rng):
    accepted = 0
    for _ in range(400):
        argv = random_argv(rng)
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            err = capsys.readouterr().err
            assert exc.code == 2 and err.count("\n") == 1, (argv, err)
            continue
        try:
            config = config_from_args(args)
        except UsageError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(("--", "flags: ")), (argv, exc)
            continue
        written = json.dumps(config.to_dict(), allow_nan=False)
        assert TrainConfig.from_dict(json.loads(written)) == config, argv
        accepted += 1
    assert accepted > 0
