"""Versioned epoch orders: runs of a seed sweep see unrelated orders, and a checkpoint resumes on the order it was
trained with."""

import dataclasses

import torch

from nf4lora.trainer.checkpoint import STATE_FILE, list_checkpoints, load_state, write_manifest
from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.data import DATA_ORDER, IGNORE_INDEX, BatchPlan, Example
from nf4lora.trainer.job import prepare, run_train

ROWS = [Example([1, i], [IGNORE_INDEX, i]) for i in range(3, 43)]


def epoch_rows(plan, epoch):
    """Row ids of one epoch in visiting order (micro-batches of one row)."""
    return [plan.micro_batch_at(epoch * plan.per_epoch + i).input_ids[0, 1].item() for i in range(plan.per_epoch)]


def test_a_seeds_later_epochs_do_not_repeat_the_next_seeds_first():
    for seed in range(6):
        plan, next_plan = (BatchPlan(ROWS, 1, s, pad_id=0, packed=False) for s in (seed, seed + 1))
        assert epoch_rows(plan, 1) != epoch_rows(next_plan, 0)
        assert epoch_rows(plan, 0) != epoch_rows(plan, 1)


def test_order_version_1_is_seed_plus_epoch():
    plan = BatchPlan(ROWS, 1, 7, pad_id=0, packed=False, data_order=1)
    expected = torch.randperm(len(ROWS), generator=torch.Generator().manual_seed(7 + 2))
    assert epoch_rows(plan, 2) == [ROWS[i].input_ids[1] for i in expected.tolist()]


def test_a_checkpoint_keeps_its_order_version_and_one_without_resumes_on_version_1(tmp_path, tiny_model_dir, data_file):
    run = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=1,
                         micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32")
    run_train(config, log=lambda _: None)
    (checkpoint,) = list_checkpoints(run)
    assert load_state(checkpoint)["data_order"] == DATA_ORDER == 2
    resumed = dataclasses.replace(config, resume=str(run), max_steps=2)
    assert prepare(resumed).plan.data_order == 2
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    del state["data_order"]  # as saved before the order had versions
    torch.save(state, checkpoint / STATE_FILE)
    write_manifest(checkpoint)
    assert prepare(resumed).plan.data_order == 1
