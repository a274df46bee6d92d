"""loss.png is replaced like the run's other files: a write that fails leaves the previous file whole and no temp
file behind, and a failure to write it at the end of a run is one TrainingFailed line."""

import errno
import pathlib

import pytest

import nf4lora.trainer.job as job
from nf4lora.files import publish_file
from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.loop import TrainingFailed
from nf4lora.trainer.metrics import PLOT_FILE, MetricsLog, plot_loss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_steps(run, steps):
    log = MetricsLog(run)
    for step in steps:
        log.write({"step": step, "loss": 10.0 - step, "lr": 1e-3, "tokens_per_s": 5.0})
    log.close()


def test_publish_file_that_fails_mid_write_keeps_the_old_file_and_no_temp(monkeypatch, tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b"the previous version")

    def disk_full_halfway(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        publish_file(path, b"the new version, longer than the old")
    assert path.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_loss_plot_that_fails_mid_write_keeps_the_previous_png(monkeypatch, tmp_path):
    figure = pytest.importorskip("matplotlib.figure")
    write_steps(tmp_path, range(1, 4))
    previous = plot_loss(tmp_path).read_bytes()
    assert previous.startswith(PNG_SIGNATURE)

    def crash_mid_write(self, target, **kwargs):
        if isinstance(target, (str, pathlib.Path)):
            pathlib.Path(target).write_bytes(PNG_SIGNATURE)
        else:
            target.write(PNG_SIGNATURE)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(figure.Figure, "savefig", crash_mid_write)
    write_steps(tmp_path, range(4, 6))
    with pytest.raises(OSError, match="Input/output error"):
        plot_loss(tmp_path)
    assert (tmp_path / PLOT_FILE).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLOT_FILE, "metrics.jsonl"]


def test_a_failed_loss_plot_write_ends_the_run_in_one_line(monkeypatch, tmp_path, tiny_model_dir, data_file):
    def disk_full(run_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job, "plot_loss", disk_full)
    config = TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(tmp_path / "run"),
                         max_steps=1, micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32")
    with pytest.raises(TrainingFailed, match=r"could not write loss.png in .*No space left on device.*; training "
                                             r"finished and .*checkpoint-1 holds the final adapter"):
        job.run_train(config, log=lambda _: None)
