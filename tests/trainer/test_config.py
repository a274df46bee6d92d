import dataclasses

import pytest

from nf4lora.trainer.cli import build_parser
from nf4lora.trainer.config import TrainConfig, UsageError, config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_field_has_a_kebab_case_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text


def test_issue_flag_names_are_kept():
    for flag in ("--model", "--data", "--output-dir", "--max-steps", "--epochs", "--micro-batch", "--grad-accum",
                 "--lr", "--max-len", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules",
                 "--save-steps", "--eval-steps", "--resume", "--seed", "--overwrite"):
        assert flag in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_defaults_follow_qlora():
    config = parse()
    assert config.quantization == "nf4" and config.double_quant and config.blocksize == 64
    assert config.target_modules == "all-linear" and config.max_grad_norm == 0.3
    assert config.optimizer == "paged-adamw-32bit" and config.gradient_checkpointing


def test_toml_sets_values_and_flags_override_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lora_r = 8\nlora-alpha = 16\nlr = 1e-3\npacking = true\ntarget_modules = ["q_proj", "v_proj"]\n')
    config = parse("--config", str(path), "--lora-r", "4", "--no-packing")
    assert (config.lora_r, config.lora_alpha, config.lr, config.packing) == (4, 16.0, 1e-3, False)
    assert config.target_modules_value() == ["q_proj", "v_proj"]


def test_toml_train_table_is_accepted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nmax_steps = 7\n")
    assert parse("--config", str(path)).max_steps == 7


@pytest.mark.parametrize("text, match", [
    ("lora_rank = 8\n", "unknown key 'lora_rank'"),
    ('lora_r = "eight"\n', "lora_r = 'eight' should be an int"),
    ("lora_r = [\n", "invalid TOML"),
])
def test_bad_toml_is_a_usage_error(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        parse("--config", str(path))


@pytest.mark.parametrize("values, match", [
    ({"lora_r": 0}, r"--lora-r 0 must be a positive integer"),
    ({"lora_alpha": -1.0}, r"--lora-alpha -1.0 must be > 0"),
    ({"lora_dropout": 1.0}, r"--lora-dropout 1.0 must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"--lora-dropout -0.1 must be in \[0, 1\)"),
    ({"schedule": "step"}, "--schedule 'step' is not valid; use one of constant, linear, cosine"),
    ({"template": "no placeholder"}, r"must contain the placeholder \{prompt\}"),
    ({"micro_batch": 0}, "--micro-batch 0 must be >= 1"),
])
def test_invalid_values_name_the_flag_and_valid_range(values, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig(**values)


def test_target_modules_forms():
    assert TrainConfig(target_modules="all-linear").target_modules_value() == "all-linear"
    assert TrainConfig(target_modules="q_proj, v_proj").target_modules_value() == ["q_proj", "v_proj"]
    assert TrainConfig(target_modules=r".*\.(q|v)_proj").target_modules_value() == r".*\.(q|v)_proj"


def test_config_round_trips_through_dict():
    config = TrainConfig(lora_r=4, packing=True, model="m")
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_demo_defaults_apply_only_without_model_and_data():
    from nf4lora.trainer.config import DEMO_DEFAULTS

    assert parse().lr == DEMO_DEFAULTS["lr"] and parse().micro_batch == DEMO_DEFAULTS["micro_batch"]
    assert parse("--lr", "5e-4").lr == 5e-4
    assert parse("--data", "d.jsonl").lr == TrainConfig().lr


def test_resume_starts_from_the_saved_config_and_flags_still_win():
    saved = TrainConfig(model="m", lora_r=8, lr=1e-3, output_dir="old/place").to_dict()
    config = config_from_args(build_parser().parse_args(["train", "--resume", "x", "--max-steps", "9"]), saved)
    assert (config.model, config.lora_r, config.lr, config.max_steps) == ("m", 8, 1e-3, 9)
    assert config.output_dir is None and config.resume == "x"
