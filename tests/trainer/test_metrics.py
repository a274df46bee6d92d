import builtins
import json

import pytest

from nf4lora.trainer.metrics import MetricsLog, Progress, perplexity, plot_loss, read_metrics


def write_steps(run, steps):
    log = MetricsLog(run)
    for step in steps:
        log.write({"step": step, "loss": 10.0 - step, "lr": 1e-3, "tokens_per_s": 5.0})
        if step % 2 == 0:
            log.write({"step": step, "eval_loss": 9.0 - step, "eval_ppl": perplexity(9.0 - step)})
    log.close()


def test_resume_drops_metrics_after_the_checkpoint_step(tmp_path):
    write_steps(tmp_path, range(1, 6))
    MetricsLog(tmp_path, resume_step=2).close()
    assert [(r["step"], "loss" in r) for r in read_metrics(tmp_path)] == [(1, True), (2, True), (2, False)]


def test_every_line_is_standalone_json(tmp_path):
    write_steps(tmp_path, range(1, 4))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_perplexity_never_overflows_json(tmp_path):
    assert perplexity(1000.0) == float("inf") and perplexity(0.0) == 1.0
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "eval_loss": 1000.0, "eval_ppl": perplexity(1000.0)})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["eval_ppl"] is None


def test_loss_plot_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    write_steps(tmp_path, range(1, 6))
    path = plot_loss(tmp_path)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    write_steps(tmp_path, range(1, 3))
    assert plot_loss(tmp_path) is None


def test_progress_without_tqdm_prints_plain_lines(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    progress = Progress(total=2, initial=0, enabled=True)
    for step in (1, 2):
        progress.update({"step": step, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0, "gpu_mem_gib": 1.25})
    progress.close()
    err = capsys.readouterr().err
    assert "step 2/2 loss 1.5000 lr 1.00e-03 tok/s 100 mem 1.25GiB" in err
