import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nf4lora.trainer.checkpoint import list_checkpoints, load_state
from nf4lora.trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def metric_steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_sigint_saves_a_complete_checkpoint_and_the_run_resumes_from_it(tmp_path, tiny_model_dir, data_file, capsys):
    run = tmp_path / "run"
    flags = ["--model", str(tiny_model_dir), "--data", str(data_file), "--micro-batch", "2", "--max-len", "192",
             "--no-progress", "--max-new-tokens", "0", "--dtype", "fp32"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, "--max-steps", "200",
                             "--output-dir", str(run)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 240
    while len(metric_steps(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    checkpoints = list_checkpoints(run)
    assert len(checkpoints) == 1 and not list(run.glob(".checkpoint-*"))
    step = load_state(checkpoints[0])["step"]
    assert 2 <= step < 200 and metric_steps(run) == list(range(1, step + 1))
    assert main(["train", "--resume", str(run), "--max-steps", str(step + 2), "--no-progress"]) == 0
    assert metric_steps(run) == list(range(1, step + 3))
