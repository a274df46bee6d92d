"""Config audit: every way a value reaches TrainConfig (flags, TOML, from_dict, the constructor) is checked."""

import dataclasses
from pathlib import Path

import pytest

from nf4lora.trainer.cli import build_parser
from nf4lora.trainer.config import TrainConfig, UsageError, config_from_args, requested_resume


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def toml(tmp_path, content):
    path = tmp_path / "run.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_a_template_whose_only_placeholder_is_escaped_is_refused():
    """``{{prompt}}`` is the literal text "{prompt}": every prompt would silently vanish from the training input."""
    with pytest.raises(UsageError, match=r"--template 'Q: \{\{prompt\}\}\\n' must contain the placeholder \{prompt\}"):
        TrainConfig(template="Q: {{prompt}}\n")


def test_a_placeholder_with_a_conversion_or_format_spec_is_a_placeholder():
    assert TrainConfig(template="Q: {prompt!s}\nA: ").template == "Q: {prompt!s}\nA: "
    assert TrainConfig(template="{{literal}} {prompt:>3}").template.format(prompt="x") == "{literal}   x"


@pytest.mark.parametrize("warmup", [6, 100])
def test_warmup_longer_than_max_steps_is_refused(warmup):
    with pytest.raises(UsageError, match=rf"^--warmup-steps {warmup} must be in \[0, 5\], the run's 5 optimizer "
                                         rf"steps \(--max-steps 5\)$"):
        TrainConfig(max_steps=5, warmup_steps=warmup)
    assert TrainConfig(max_steps=5, warmup_steps=5).warmup_steps == 5


def test_warmup_longer_than_an_epochs_run_is_refused_once_its_length_is_known():
    config = TrainConfig(epochs=1.0, warmup_steps=8)
    config.check_warmup(total_steps=8)
    with pytest.raises(UsageError, match=r"^--warmup-steps 8 must be in \[0, 7\], the run's 7 optimizer steps "
                                         r"\(--epochs 1.0\)$"):
        config.check_warmup(total_steps=7)


def test_a_job_refuses_a_warmup_longer_than_its_epochs_before_writing_anything(tiny_config):
    from nf4lora.trainer.job import prepare

    config = dataclasses.replace(tiny_config, max_steps=0, epochs=0.5, warmup_steps=100)
    with pytest.raises(UsageError, match=r"--warmup-steps 100 must be in \[0, \d+\], the run's \d+ optimizer steps "
                                         r"\(--epochs 0.5\)"):
        prepare(config)
    assert not Path(config.output_dir).exists()


def test_the_demo_warmup_default_yields_to_a_shorter_explicit_max_steps():
    """``nf4lora train --max-steps 3`` must not be refused over a warmup the user never set."""
    assert parse("--max-steps", "3").warmup_steps == 3
    assert parse("--max-steps", "300").warmup_steps == 10
    with pytest.raises(UsageError, match=r"--warmup-steps 4 must be in \[0, 3\]"):
        parse("--max-steps", "3", "--warmup-steps", "4")


def test_a_mistyped_max_steps_in_the_demo_is_still_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"run.toml: max_steps = '5' should be an int"):
        parse("--config", toml(tmp_path, 'max_steps = "5"\n'))


def test_toml_keys_outside_the_train_table_are_refused(tmp_path):
    """They used to be dropped without a word once a [train] table was present."""
    path = toml(tmp_path, "lr = 5e-4\n[train]\nmax_steps = 7\n")
    with pytest.raises(UsageError, match=r"run.toml: key 'lr' lies outside the \[train\] table; move it into"):
        parse("--config", path)


def test_a_train_key_that_is_not_a_table_is_refused(tmp_path):
    path = toml(tmp_path, "train = 5\n")
    with pytest.raises(UsageError, match=r"run.toml: train = 5 should be a table of TrainConfig keys"):
        parse("--config", path)
    with pytest.raises(UsageError, match=r"run.toml: train = 5 should be a table"):
        requested_resume(build_parser().parse_args(["train", "--config", path]))


def test_a_toml_key_given_in_both_spellings_is_refused(tmp_path):
    path = toml(tmp_path, "lora_r = 8\nlora-r = 4\n")
    with pytest.raises(UsageError, match=r"run.toml: 'lora_r' and 'lora-r' both set lora_r; keep one"):
        parse("--config", path)


def test_toml_with_a_byte_order_mark_is_read(tmp_path):
    assert parse("--config", toml(tmp_path, b"\xef\xbb\xbfmax_steps = 7\n")).max_steps == 7


def test_toml_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = toml(tmp_path, b'template = "caf\xe9 {prompt}"\n')
    with pytest.raises(UsageError, match=r"--config .*run.toml is not UTF-8 text \(byte 15\); save it as UTF-8"):
        parse("--config", path)


@pytest.mark.parametrize("values, match", [
    ({"packing": "false"}, r"TrainConfig: packing = 'false' should be a bool"),
    ({"max_len": "256"}, r"TrainConfig: max_len = '256' should be an int"),
    ({"lr": "1e-3"}, r"TrainConfig: lr = '1e-3' should be a float"),
    ({"lora_r": 8.0}, r"TrainConfig: lora_r = 8.0 should be an int"),
    ({"max_len": None}, r"TrainConfig: max_len = None should be an int"),
])
def test_the_constructor_checks_types_like_the_toml_loader(values, match):
    """``TrainConfig(packing="false")`` used to turn packing on; a str max_len was a bare TypeError."""
    with pytest.raises(UsageError, match=match):
        TrainConfig(**values)


def test_the_constructor_converts_ints_to_floats_and_paths_to_str(tmp_path):
    config = TrainConfig(lr=1, epochs=2, data=tmp_path / "d.jsonl")
    assert (type(config.lr), type(config.epochs), config.data) == (float, float, str(tmp_path / "d.jsonl"))


def test_from_dict_refuses_none_for_a_field_that_is_not_optional():
    with pytest.raises(UsageError, match=r"saved: max_len = None should be an int"):
        TrainConfig.from_dict({"max_len": None}, source="saved")
    assert TrainConfig.from_dict({"model": None}).model is None


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_the_range_torch_takes_is_refused(seed):
    """2**64 used to pass here and crash in torch.manual_seed after the data was loaded."""
    with pytest.raises(UsageError, match=rf"--seed {seed} must be in \[0, 2\*\*63\)"):
        TrainConfig(seed=seed)
