"""CLI audit: user errors of generate, merge and quantize end in one line and exit 2, and --out is never lost or
left half-written."""

import re
from pathlib import Path

import pytest

from nf4lora.trainer.cli import main


@pytest.fixture
def adapter(trained_run):
    return trained_run


def one_line_usage_error(capsys, argv, pattern):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"nf4lora {argv[0]}: error: "), err
    assert re.search(pattern, err), err


def files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


GENERATE_ERRORS = {
    "template field": (["--template", "{prompt} {x}"], r"--template '\{prompt\} \{x\}' cannot be filled in"),
    "template index": (["--template", "{prompt} {0}"], r"--template .* cannot be filled in \(IndexError"),
    "template brace": (["--template", "{prompt}}"], r"--template .* cannot be filled in \(ValueError"),
    "temperature": (["--temperature", "-1"], r"--temperature -1.0 must be a finite number >= 0"),
    "nan temperature": (["--temperature", "nan"], r"--temperature nan must be a finite number >= 0"),
    "top-p zero": (["--top-p", "0"], r"--top-p 0.0 must be in \(0, 1\]"),
    "top-p above one": (["--top-p", "1.5"], r"--top-p 1.5 must be in \(0, 1\]"),
    "top-k": (["--top-k", "-3"], r"--top-k -3 must be >= 0"),
}


@pytest.mark.parametrize("case", list(GENERATE_ERRORS))
def test_generate_flags_are_checked_by_flag_name_before_the_model_loads(capsys, tmp_path, case):
    """The model directory does not exist: the flag's own message proves it was checked before loading."""
    extra, pattern = GENERATE_ERRORS[case]
    one_line_usage_error(capsys, ["generate", "--model", tmp_path / "nope", "--prompt", "x", *extra], pattern)


@pytest.mark.parametrize("name,content,pattern", [
    ("latin1.txt", b"caf\xe9\n", r"--prompts-file .*latin1.txt is not UTF-8 text \(byte 3\); save it as UTF-8"),
    ("latin1.jsonl", b'{"prompt": "caf\xe9"}\n', r"--prompts-file .*latin1.jsonl is not UTF-8 text"),
    ("folder", None, r"--prompts-file .*folder is a directory"),
], ids=["latin1-txt", "latin1-jsonl", "directory"])
def test_generate_names_an_unreadable_prompts_file(capsys, tmp_path, tiny_model_dir, name, content, pattern):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    one_line_usage_error(capsys, ["generate", "--model", tiny_model_dir, "--prompts-file", path], pattern)


def test_an_empty_out_directory_is_filled(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    out.mkdir()
    assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()


def test_out_below_a_file_is_one_line(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    one_line_usage_error(capsys, ["quantize", "--model", tiny_model_dir, "--out", tmp_path / "file" / "q"],
                         r"--out .*file/q: .*file is a file; pass a directory path")


def test_overwrite_never_replaces_a_file_an_input_or_a_directory_of_something_else(capsys, tmp_path,
                                                                                    tiny_model_dir):
    (tmp_path / "notes.txt").write_text("keep me")
    base = ["quantize", "--model", tiny_model_dir, "--overwrite", "--out"]
    one_line_usage_error(capsys, [*base, tmp_path / "notes.txt"], r"notes.txt is a file")
    one_line_usage_error(capsys, [*base, tmp_path], r"is not empty and holds no model checkpoint")
    before = files(tiny_model_dir)
    one_line_usage_error(capsys, [*base, tiny_model_dir], r"holds the input")
    one_line_usage_error(capsys, [*base, tiny_model_dir.parent], r"holds the input")
    assert (tmp_path / "notes.txt").read_text() == "keep me" and files(tiny_model_dir) == before


def test_a_merge_that_fails_leaves_the_checkpoint_in_out_untouched(capsys, tmp_path, tiny_model_dir, adapter):
    out = tmp_path / "merged"
    common = ["merge", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "fp32"]
    assert main([*common, "--adapter", str(adapter)]) == 0
    before = files(out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    one_line_usage_error(capsys, [*common, "--adapter", broken, "--overwrite"], r"adapter_model.safetensors")
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "merged"]


def test_a_save_interrupted_midway_leaves_no_half_written_out(monkeypatch, tmp_path, tiny_model_dir):
    def write_half_then_interrupt(model, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("nf4lora.model.save_quantized", write_half_then_interrupt)
    assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q")]) == 130
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_to_requantize_into_another_format_than_nf4(capsys, tmp_path, tiny_model_dir):
    """--quantize nf4 re-quantizes in the base's format: with --quantization fp4 it wrote FP4 and said NF4."""
    one_line_usage_error(capsys, ["merge", "--model", tiny_model_dir, "--adapter", tmp_path, "--out", tmp_path / "m",
                                  "--quantization", "fp4", "--quantize", "nf4"],
                         r"--quantize nf4 .* pass --quantization nf4 \(got fp4\)")


def test_quantize_output_loads_with_transformers_and_bitsandbytes_on_the_cpu(tmp_path, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    import torch

    from nf4lora.model import load_model

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_model(str(out), dtype=torch.bfloat16)(ids).float()
        actual = theirs(input_ids=ids).logits.float()
    # Both dequantize the same NF4 bytes and compute in bf16 (rounding 2**-8), through two tiny layers.
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-2)
