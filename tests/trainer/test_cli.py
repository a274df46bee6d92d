import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from nf4lora.trainer.checkpoint import write_manifest
from nf4lora.trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.fixture
def fast_flags(tiny_model_dir, data_file):
    return ["--model", str(tiny_model_dir), "--data", str(data_file), "--max-steps", "1", "--micro-batch", "2",
            "--max-len", "192", "--no-progress", "--max-new-tokens", "0", "--dtype", "fp32"]


def bad_jsonl(tmp_path, text, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def output_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    return ["--output-dir", str(tmp_path / "afile" / "run")]


ERROR_CASES = {
    "missing model": (lambda t, f: ["--model", str(t / "nope")], r"model directory .*nope does not exist; pass a "
                                                                 r"Hugging Face model directory"),
    "missing data": (lambda t, f: ["--data", str(t / "nope.jsonl")], r"data file .*nope.jsonl does not exist"),
    "empty data": (lambda t, f: ["--data", bad_jsonl(t, "")], r"bad.jsonl is empty"),
    "malformed line": (lambda t, f: ["--data", bad_jsonl(t, '{"text": "a"}\n{oops\n')],
                       r"bad.jsonl line 2: malformed JSON"),
    "missing field": (lambda t, f: ["--data", bad_jsonl(t, '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')],
                      r"bad.jsonl line 2: record has no 'completion' field"),
    "rank": (lambda t, f: ["--lora-r", "0"], r"--lora-r 0 must be a positive integer"),
    "alpha": (lambda t, f: ["--lora-alpha", "0"], r"--lora-alpha 0.0 must be > 0"),
    "dropout": (lambda t, f: ["--lora-dropout", "1.0"], r"--lora-dropout 1.0 must be in \[0, 1\)"),
    "targets": (lambda t, f: ["--target-modules", "qq_proj"],
                r"--target-modules qq_proj: .*matches no linear module; "
                r"valid names: down_proj,.*q_proj.*, or all-linear"),
    "infinite lr": (lambda t, f: ["--lr", "inf"], r"--lr inf is not a finite number"),
    "nan alpha": (lambda t, f: ["--lora-alpha", "nan"], r"--lora-alpha nan is not a finite number"),
    "nan clip": (lambda t, f: ["--max-grad-norm", "nan"], r"--max-grad-norm nan is not a finite number"),
    "infinite epochs": (lambda t, f: ["--epochs", "inf", "--max-steps", "0"], r"--epochs inf is not a finite number"),
    "weight decay": (lambda t, f: ["--weight-decay", "-1"], r"--weight-decay -1.0 must be >= 0"),
    "template field": (lambda t, f: ["--template", "{prompt} {x}"],
                       r"--template '\{prompt\} \{x\}' cannot be filled in \(KeyError: 'x'\); \{prompt\} is its only"),
    "template index": (lambda t, f: ["--template", "{prompt} {0}"], r"--template .* cannot be filled in \(IndexError"),
    "template brace": (lambda t, f: ["--template", "{prompt}}"], r"--template .* cannot be filled in \(ValueError"),
    "output below a file": (lambda t, f: output_below_a_file(t),
                            r"--output-dir .*afile/run: .*afile is a file; pass a directory path"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_line_exit_2_and_no_output_dir(case, capsys, tmp_path, fast_flags):
    extra, pattern = ERROR_CASES[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", str(out), *extra(tmp_path, fast_flags))
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("nf4lora train: error: ")
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not list(tmp_path.glob(".base_model-*"))


def test_occupied_output_dir_needs_overwrite_and_resume_must_be_compatible(capsys, tmp_path, fast_flags):
    out = str(tmp_path / "out")
    assert run_cli(capsys, "train", *fast_flags, "--output-dir", out)[0] == 0
    before = sorted(p.name for p in Path(out).iterdir())
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", out)
    assert code == 2 and "already holds a run; pass --overwrite" in err
    assert sorted(p.name for p in Path(out).iterdir()) == before
    code, err = run_cli(capsys, "train", *fast_flags, "--resume", out, "--lora-r", "4")
    assert code == 2 and "incompatible checkpoint" in err and "lora_r=16" in err
    code, err = run_cli(capsys, "train", *fast_flags, "--resume", str(tmp_path))
    assert code == 2 and "no trainer_state.pt there" in err
    assert run_cli(capsys, "train", *fast_flags, "--output-dir", out, "--overwrite")[0] == 0


def test_non_run_directory_is_never_overwritten(capsys, tmp_path, fast_flags):
    (tmp_path / "mine.txt").write_text("keep me")
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", str(tmp_path), "--overwrite")
    assert code == 2 and "holds no nf4lora run" in err and (tmp_path / "mine.txt").exists()


def test_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--schedule", "weird"])
    assert exc.value.code == 2


def test_inspect_reports_sizes_and_lora_targets(capsys, tiny_model_dir):
    assert main(["inspect", "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                      "v_proj"]
    per = report["bytes_per_parameter"]
    assert per["bf16"] == 2.0 and per["nf4_double_quant"] < per["nf4"] < per["bf16"]
    # Linear weights alone: NF4 = 0.5 + 4/64 bytes; double quant = 0.5 + 1/64 + a little.
    lin = report["quantized_parameters"]
    dense = report["parameters"] - lin
    assert (report["bytes"]["nf4"] - 2 * dense) / lin == pytest.approx(0.5625, rel=1e-3)
    assert main(["inspect", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "nf4 + double quant" in out
    assert not out.strip().splitlines()[-1].startswith("{")  # the JSON report only with --json


def test_train_py_is_the_train_subcommand():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "usage: nf4lora train" in result.stdout and "--lora-r" in result.stdout


def test_a_default_job_that_fails_after_generating_its_base_leaves_nothing_behind(capsys, tmp_path):
    """Without --model the base is generated into a temp dir before the LoRA targets are checked; when that check
    fails the temp dir is removed and no run directory appears next to it."""
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", "--output-dir", str(out), "--target-modules", "qq_proj", "--max-steps", "1",
                        "--no-progress")
    assert code == 2 and len(err.splitlines()) == 1 and "--target-modules qq_proj" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_with_overwrite_leaves_the_existing_run_untouched(capsys, tmp_path, fast_flags):
    """--overwrite replaces a run only once every check has passed: a run that fails its checks deletes nothing."""
    out = tmp_path / "out"
    assert run_cli(capsys, "train", *fast_flags, "--output-dir", str(out))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", str(out), "--overwrite",
                        "--target-modules", "qq_proj")
    assert code == 2 and "--target-modules qq_proj" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _narrow_one_lora_a(checkpoint):
    """Cut one LoRA A of the checkpoint's adapter to rank 4; returns the message that names it."""
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if k.endswith("q_proj.lora_A.weight"))[0]
    tensors[key] = tensors[key][:4].contiguous()
    save_file(tensors, str(weights))
    write_manifest(checkpoint)
    return "checkpoint-1/adapter_model.safetensors: key " + re.escape(f"{key} has shape (4, 64), expected (16, 64)")


def _cut_file(name, size):
    def cut(checkpoint):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[:size])
        write_manifest(checkpoint)
        return f"checkpoint-1/{name}( is not a readable safetensors file|: malformed JSON)"
    return cut


@pytest.mark.parametrize("damage", [_narrow_one_lora_a, _cut_file("adapter_model.safetensors", 100),
                                    _cut_file("adapter_model.safetensors", 0), _cut_file("adapter_config.json", 10)],
                         ids=["wrong-shape", "truncated-weights", "empty-weights", "truncated-config"])
def test_resume_from_a_checkpoint_with_a_damaged_adapter_is_one_line_exit_2(capsys, tmp_path, fast_flags, damage):
    """A checkpoint whose adapter does not fit the model (one LoRA A cut to rank 4) or is cut short (its weights
    or its config) is refused with one line naming the file and the problem, and the run directory is left as it
    was. The manifest is rewritten to agree, as a broken writer would leave it, so that the adapter loader's own
    checks are what refuses it (test_checkpoint_audit.py covers damage the manifest catches)."""
    out = tmp_path / "out"
    assert run_cli(capsys, "train", *fast_flags, "--output-dir", str(out))[0] == 0
    problem = damage(out / "checkpoint-1")
    before = sorted(p.name for p in out.iterdir())
    code, err = run_cli(capsys, "train", "--resume", str(out), "--max-steps", "2", "--no-progress")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(problem, err), err
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_drops_a_metrics_line_a_killed_run_left_unfinished(capsys, tmp_path, fast_flags):
    """A kill mid-write leaves metrics.jsonl ending in part of a line: the resume drops it and carries on. A broken
    line before the end is refused with one line naming the file and the line."""
    out = tmp_path / "out"
    assert run_cli(capsys, "train", *fast_flags, "--output-dir", str(out))[0] == 0
    metrics = out / "metrics.jsonl"
    complete = metrics.read_text()
    metrics.write_text(complete + '{"step": 5, "lo')
    assert run_cli(capsys, "train", "--resume", str(out), "--max-steps", "2", "--no-progress")[0] == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    metrics.write_text('{"step": 1, "lo\n' + metrics.read_text())
    code, err = run_cli(capsys, "train", "--resume", str(out), "--max-steps", "3", "--no-progress")
    assert code == 2 and len(err.splitlines()) == 1 and "metrics.jsonl: line 1 is not a metrics record" in err, err


def test_python_dash_m_nf4lora_is_the_nf4lora_command():
    result = subprocess.run([sys.executable, "-m", "nf4lora", "inspect", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "usage: nf4lora inspect" in result.stdout and "--json" in result.stdout
    result = subprocess.run([sys.executable, "-m", "nf4lora", "bogus"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr


def test_warnings_during_a_command_print_as_one_line_named_for_the_command(monkeypatch):
    from nf4lora.trainer import commands

    shown = []
    monkeypatch.setattr(commands, "inspect_command", lambda args: shown.append(
        warnings.formatwarning(UserWarning("requantizing rounds the update away\nsecond line"), UserWarning,
                               "/site-packages/x.py", 7)) or 0)
    before = warnings.formatwarning
    assert main(["inspect", "--model", "unused"]) == 0
    assert shown == ["nf4lora inspect: warning: requantizing rounds the update away\n"]
    assert warnings.formatwarning is before  # restored for the rest of the process
