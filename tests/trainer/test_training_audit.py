"""Training-logic audit: how long an --epochs run trains, against hand-computed micro-batch counts."""

import dataclasses

from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.job import run_length, run_train
from nf4lora.trainer.metrics import read_metrics


def steps_and_epoch(config, tmp_path, **values):
    """(optimizer steps, epoch after the last one) of an --epochs run without validation."""
    config = dataclasses.replace(config, max_steps=0, val_fraction=0.0, max_new_tokens=0, **values)
    run_train(config, log=lambda _: None)
    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    return len(train), train[-1]["epoch"]


def test_whole_epochs_end_with_the_epoch_even_when_grad_accum_does_not_divide_it(tiny_config, tmp_path):
    """24 rows at max-len 192 / micro-batch 4 = 6 micro-batches per epoch. 2 epochs are 12 micro-batches = 3 steps
    of 4, not 2 x ceil(6 / 4) = 4 steps (2.67 epochs, 8 examples seen three times)."""
    assert steps_and_epoch(tiny_config, tmp_path, epochs=2.0, micro_batch=4, grad_accum=4) == (3, 2.0)


def test_fractional_epochs_end_on_the_micro_batch_they_name(tiny_config, tmp_path):
    """1.5 epochs of 6 micro-batches = 9 micro-batches: steps of 4, 4 and a last one of 1."""
    assert steps_and_epoch(tiny_config, tmp_path, epochs=1.5, micro_batch=4, grad_accum=4) == (3, 1.5)


def test_run_length_counts_micro_batches_not_rounded_up_steps():
    assert run_length(TrainConfig(epochs=3.0, grad_accum=4), per_epoch=250) == (188, 750)  # not 3 x 63 = 189
    assert run_length(TrainConfig(epochs=1.1, grad_accum=1), per_epoch=50) == (55, 55)  # 1.1 * 50 > 55 in floats
    assert run_length(TrainConfig(max_steps=5, epochs=9.0, grad_accum=2), per_epoch=3) == (5, 10)
