"""Resume exactness at the edges, and trainer states a resume cannot use: claims a fuzz audit found broken.

An extended run (``--max-steps`` raised on resume) trained its first new step at the old schedule's last lr, 0 at the
end of a linear or cosine decay. A ``trainer_state.pt`` edited or written elsewhere (its manifest rewritten to match)
crashed with a traceback, rewrote the run's files before failing, or resumed silently at a wrong step.
"""

import contextlib
import dataclasses
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nf4lora.trainer.checkpoint import SCHEDULER_KEYS, STATE_FILE, list_checkpoints, load_state, write_manifest
from nf4lora.trainer.cli import main
from nf4lora.trainer.job import run_train
from nf4lora.trainer.loop import lr_lambda
from nf4lora.trainer.metrics import read_metrics


def quiet(_):
    pass


def metric_lines(run):
    """Every metrics line without the timing fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in read_metrics(run)]


def adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- resume exactness at the edges

def random_config(tiny_config, rng, tmp_path, **fixed):
    """A small random run: micro-batch, accumulation, packing, dropout, optimizer and seed drawn from ``rng``."""
    drawn = dict(micro_batch=rng.choice([1, 2, 4]), grad_accum=rng.choice([1, 2]), packing=rng.random() < 0.5,
                 lora_r=rng.choice([2, 8]), lora_dropout=rng.choice([0.0, 0.2]), seed=rng.randrange(2**32),
                 optimizer=rng.choice(["paged-adamw-32bit", "paged-adamw-8bit", "adamw-32bit"]),
                 gradient_checkpointing=rng.random() < 0.5, val_fraction=rng.choice([0.0, 0.1]),
                 eval_steps=rng.choice([0, 2]), max_new_tokens=0, output_dir=str(tmp_path / "full"),
                 # at the fixture's 192 half the clauses lose every response token, and about one split in 40 leaves
                 # no validation example to evaluate, which is refused; at 256 every clause keeps its response
                 max_len=256)
    config = {**drawn, **fixed}
    if config["val_fraction"] == 0:  # an --eval-steps without evaluation data is refused
        config["eval_steps"] = 0
    return dataclasses.replace(tiny_config, **config)


def assert_resumed_run_equals(part, full):
    assert metric_lines(part) == metric_lines(full)
    assert same_tensors(adapter(part), adapter(full))


def epoch_end(lines):
    """The step that ends the first epoch, from the uninterrupted run's metrics lines."""
    return next(r["step"] for r in lines if r.get("epoch") == 1.0)


class Killed(BaseException):
    """The process dying after a step's metrics line is written (nothing in the trainer may catch it)."""


def interrupt_at(kind, step):
    """on_step hook: after ``step``, request a stop as Ctrl-C does (``kind`` "stop") or die ("kill")."""
    def hook(trainer, record):
        if record["step"] == step and kind == "kill":
            raise Killed(step)
        if record["step"] == step:
            trainer.request_stop()
    return hook


# Each plan: config changes, and the interruptions (from the uninterrupted run's metrics lines), each followed by a
# resume from the run's latest checkpoint.
EDGE_PLANS = {
    "stopped-twice-in-a-row": (dict(max_steps=5), lambda lines: [("stop", 2), ("stop", 3)]),
    "killed-at-the-last-step": (dict(max_steps=4, save_steps=3), lambda lines: [("kill", 4)]),
    "killed-right-after-a-periodic-checkpoint": (dict(max_steps=5, save_steps=2), lambda lines: [("kill", 3)]),
    "stopped-at-an-epoch-boundary": (dict(max_steps=0, epochs=1.5, micro_batch=8, grad_accum=1),
                                     lambda lines: [("stop", epoch_end(lines))]),
}


@pytest.mark.parametrize("plan", list(EDGE_PLANS))
def test_a_run_interrupted_and_resumed_at_an_edge_step_equals_the_uninterrupted_run(tiny_config, tmp_path, plan):
    changes, interruptions_of = EDGE_PLANS[plan]
    full = random_config(tiny_config, random.Random(), tmp_path, **changes)
    run_train(full, log=quiet)
    part = dataclasses.replace(full, output_dir=str(tmp_path / "part"))
    for number, (kind, step) in enumerate(interruptions_of(metric_lines(tmp_path / "full"))):
        with contextlib.suppress(Killed):
            run_train(dataclasses.replace(part, resume=part.output_dir) if number else part,
                      on_step=interrupt_at(kind, step), log=quiet)
    run_train(dataclasses.replace(part, resume=part.output_dir), log=quiet)
    assert_resumed_run_equals(tmp_path / "part", tmp_path / "full")


def test_a_constant_lr_run_extended_with_more_max_steps_equals_one_run_of_that_length(tiny_config, tmp_path):
    rng = random.Random()
    short, total = rng.randint(1, 3), rng.randint(4, 5)
    full = random_config(tiny_config, rng, tmp_path, max_steps=total, schedule="constant",
                         warmup_steps=rng.randint(0, short), val_fraction=0.0)
    run_train(full, log=quiet)
    part = dataclasses.replace(full, output_dir=str(tmp_path / "part"), max_steps=short)
    run_train(part, log=quiet)
    run_train(dataclasses.replace(part, max_steps=total, resume=part.output_dir), log=quiet)
    assert_resumed_run_equals(tmp_path / "part", tmp_path / "full")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_an_extended_run_takes_each_new_steps_lr_from_its_new_schedule(tiny_config, tmp_path, schedule):
    """The old schedule had decayed to 0 at its last step: the first step of the extension trained at lr 0 (the
    adapter did not move) and logged it, the second jumped back up to the new schedule."""
    rng = random.Random()
    short = rng.randint(2, 3)
    total = short + rng.randint(1, 3)
    config = dataclasses.replace(tiny_config, max_steps=short, schedule=schedule, warmup_steps=rng.randint(0, 1),
                                 micro_batch=2, grad_accum=1, val_fraction=0.0, max_new_tokens=0, save_steps=1)
    run = tmp_path / "run"
    run_train(config, log=quiet)
    run_train(dataclasses.replace(config, max_steps=total, resume=str(run)), log=quiet)
    factor = lr_lambda(schedule, config.warmup_steps, total)
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert lrs[short:] == [config.lr * factor(s) for s in range(short, total)]
    assert not same_tensors(load_file(str(run / f"checkpoint-{short + 1}" / "adapter_model.safetensors")),
                            load_file(str(run / f"checkpoint-{short}" / "adapter_model.safetensors")))


# ------------------------------------------------------------------- trainer states a resume cannot use: refused

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, data_file):
    """A two-step fp32 run with a checkpoint at each step; tests edit a copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--max-steps", "2",
                 "--save-steps", "1", "--micro-batch", "2", "--max-len", "192", "--no-progress",
                 "--max-new-tokens", "0", "--dtype", "fp32", "--val-fraction", "0", "--output-dir", str(run)]) == 0
    return run


def edit_step(state, rng):
    state["step"] = rng.choice([None, -rng.randint(1, 9), "2", 2.0, True])


def edit_tokens(state, rng):
    state["tokens"] = rng.choice(["many", -rng.randint(1, 99), None, 1.5])


def edit_elapsed(state, rng):
    state["elapsed_s"] = rng.choice([math.nan, math.inf, -1.0, "1 s"])


def drop_schedule_key(state, rng):
    del state["scheduler"][rng.choice(SCHEDULER_KEYS)]


def replace_schedule(state, rng):
    state["scheduler"] = rng.choice([{}, None, [], 0])


def move_schedule(state, rng):
    state["scheduler"]["last_epoch"] = state["step"] + rng.choice([-2, -1, 1, 5])


def drop_rng_stream(state, rng):
    del state["rng"][rng.choice(["python", "torch"])]


def malform_rng(state, rng):
    bad = rng.choice([("torch", torch.zeros(rng.randint(1, 99), dtype=torch.uint8)), ("python", (3, (1, 2), None)),
                      ("python", "seed")])
    state["rng"][bad[0]] = bad[1]


def misfit_optimizer(state, rng):
    entries = state["optimizer"]["state"]
    entry = entries[rng.choice(list(entries))]
    entry[rng.choice(["step", "exp_avg", "exp_avg_sq"])] = torch.zeros(rng.randint(2, 9))


EDITS = [edit_step, edit_tokens, edit_elapsed, drop_schedule_key, replace_schedule, move_schedule, drop_rng_stream,
         malform_rng, misfit_optimizer]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__ for e in EDITS])
def test_an_edited_trainer_state_is_refused_in_one_line_exit_2_and_the_run_is_untouched(capsys, tmp_path,
                                                                                       finished_run, edit):
    """The manifest is rewritten to match, as by a foreign writer or a hand edit: only the state's contents tell."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoint = list_checkpoints(run)[-1]
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    edit(state, random.Random())
    torch.save(state, checkpoint / STATE_FILE)
    write_manifest(checkpoint)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    code = main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert err.startswith(f"nf4lora train: error: --resume {checkpoint}: {STATE_FILE}"), err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_an_unedited_state_still_resumes_and_restores_the_current_rng_streams_it_checked(finished_run, tmp_path):
    """The check of the RNG states restores them to try them, and must leave the caller's streams as they were."""
    from nf4lora.trainer.checkpoint import check_resumable

    checkpoint = list_checkpoints(finished_run)[-1]
    torch.manual_seed(random.randrange(2**32))
    expected = torch.get_rng_state()
    check_resumable(checkpoint, load_state(checkpoint))
    assert torch.equal(torch.get_rng_state(), expected)
