import json
import subprocess
import sys
from pathlib import Path

import pytest

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


ERROR_CASES = {
    "missing model": (lambda t, f: ["--model", str(t / "nope")], r"--model .*nope does not exist"),
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
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_line_exit_2_and_no_output_dir(case, capsys, tmp_path, fast_flags):
    extra, pattern = ERROR_CASES[case]
    out = tmp_path / "out"
    code, err = run_cli(capsys, "train", *fast_flags, "--output-dir", str(out), *extra(tmp_path, fast_flags))
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("nf4lora train: error: ")
    assert __import__("re").search(pattern, err), err
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
    assert main(["inspect", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["lora_targets"] == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                      "v_proj"]
    per = report["bytes_per_parameter"]
    assert per["bf16"] == 2.0 and per["nf4_double_quant"] < per["nf4"] < per["bf16"]
    # Linear weights alone: NF4 = 0.5 + 4/64 bytes; double quant = 0.5 + 1/64 + a little.
    lin = report["quantized_parameters"]
    dense = report["parameters"] - lin
    assert (report["bytes"]["nf4"] - 2 * dense) / lin == pytest.approx(0.5625, rel=1e-3)
    assert "q_proj" in out and "nf4 + double quant" in out


def test_train_py_is_the_train_subcommand():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "usage: nf4lora train" in result.stdout and "--lora-r" in result.stdout
