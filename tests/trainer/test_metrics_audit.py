"""metrics.jsonl on resume: what an audit found broken."""

import os
from pathlib import Path

import pytest

from nf4lora.trainer.config import UsageError
from nf4lora.trainer.metrics import METRICS_FILE, MetricsLog


def write_steps(run, steps):
    log = MetricsLog(run)
    for step in steps:
        log.write({"step": step, "loss": 10.0 - step})
        if step % 2 == 0:
            log.write({"step": step, "eval_loss": 9.0 - step})
    log.close()


class Crash(BaseException):
    """The process dying at one file-system operation (BaseException: nothing may catch it)."""


def crash_at(monkeypatch, k):
    """Make the k-th write, fsync or rename die: a write leaves the first half of its data behind."""
    count = {"n": 0}

    def due():
        count["n"] += 1
        return count["n"] == k

    def half_written(real):
        def write(path, data, *args, **kwargs):
            if due():
                real(path, data[:len(data) // 2], *args, **kwargs)
                raise Crash(f"write {path}")
            return real(path, data, *args, **kwargs)
        return write

    def dies_first(real):
        def operation(*args):
            if due():
                raise Crash(real.__name__)
            return real(*args)
        return operation

    monkeypatch.setattr(Path, "write_text", half_written(Path.write_text))
    monkeypatch.setattr(Path, "write_bytes", half_written(Path.write_bytes))
    monkeypatch.setattr(os, "fsync", dies_first(os.fsync))
    monkeypatch.setattr(os, "replace", dies_first(os.replace))


def test_a_crash_while_a_resume_trims_the_metrics_never_loses_a_kept_line(tmp_path):
    """Trimming metrics.jsonl to the checkpoint's step rewrote it in place, so a kill mid-rewrite (a second
    Ctrl-C, OOM killer) lost the run's history. Killed at every write, fsync and rename in turn, the file must hold
    either the old lines or the trimmed ones, and the next resume must still produce the trimmed ones."""
    path = tmp_path / METRICS_FILE
    write_steps(tmp_path, range(1, 6))
    original = path.read_text()
    trimmed = "".join(line + "\n" for line in original.splitlines()[:3])  # step 1, step 2 and its eval
    k = 0
    while True:
        k += 1
        path.write_text(original)
        with pytest.MonkeyPatch.context() as patch:
            crash_at(patch, k)
            try:
                MetricsLog(tmp_path, resume_step=2).close()
                crashed = False
            except Crash:
                crashed = True
        assert path.read_text() in (original, trimmed), k
        MetricsLog(tmp_path, resume_step=2).close()
        assert path.read_text() == trimmed, k
        if not crashed:
            break
    assert k > 2


@pytest.mark.parametrize("step", ["Infinity", "1e999", "NaN", "true", "2.5", '"3"', "null"])
def test_a_metrics_line_whose_step_is_not_an_integer_is_refused_in_one_line(tmp_path, step):
    """The trainer writes integer steps. Infinity crashed the resume with an OverflowError traceback; true, 2.5 and
    "3" were silently read as steps 1, 2 and 3."""
    (tmp_path / METRICS_FILE).write_text(f'{{"step": {step}, "loss": 1.0}}\n{{"step": 1, "loss": 2.0}}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl: line 1 is not a metrics record \(a JSON object with an "
                                         r"integer step\); repair or delete that line to resume") as exc:
        MetricsLog(tmp_path, resume_step=1)
    assert len(str(exc.value).splitlines()) == 1
