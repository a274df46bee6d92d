"""Leftovers of the trainer, adapter and optimizer areas: a failed adapter load on a merged model, a resume after a
crashed re-save, --eval-steps without evaluation data, pickled optimizer objects and quantize's double_quant."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nf4lora.files as files
from nf4lora.kernels import use_kernels
from nf4lora.kernels.linear import quantize as kernels_quantize
from nf4lora.lora import LoraConfig, inject_lora, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from nf4lora.lora.model import active_adapters, lora_layers
from nf4lora.nf4 import quantize
from nf4lora.optim import AdamW, PagedAdamW
from nf4lora.trainer.checkpoint import load_state, read_resume, save_checkpoint
from nf4lora.trainer.cli import build_parser, main
from nf4lora.trainer.config import DEMO_DEFAULTS, TrainConfig, UsageError, config_from_args
from nf4lora.trainer.job import run_train

# ------------------------------------------------------------------------------------ adapters on a merged model

PROJ = ("q_proj", "k_proj", "v_proj")


class _Block(nn.Module):
    """Three dense projections in a chain: (..., width) -> (..., width)."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        for name in PROJ:
            setattr(self, name, nn.Linear(width, width, dtype=dtype))

    def forward(self, x):
        return self.v_proj(torch.tanh(self.k_proj(torch.tanh(self.q_proj(x)))))


def _random_adapter(rng: random.Random, **fixed) -> LoraConfig:
    spec = {"r": rng.randint(1, 6), "lora_alpha": rng.choice([1.0, 8.0, 16.0]), "init_lora_weights": False,
            "target_modules": rng.sample(PROJ, rng.randint(1, 3))}
    spec[rng.choice(["use_dora", "lora_bias", "plain"])] = True  # peft takes no LoRA bias with DoRA
    spec.pop("plain", None)
    return LoraConfig(**{**spec, **fixed})


def _model_state(model: nn.Module) -> dict:
    """Everything a load must leave as it was: tensors (bitwise), merges, adapters, active ones, requires_grad."""
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "merged": {n: list(layer.merged_adapters) for n, layer in lora_layers(model)},
            "adapters": list(model.lora_configs), "active": active_adapters(model),
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad}}


def _assert_same_state(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, f"tensors that differ: {changed}"
    assert {k: v for k, v in after.items() if k != "tensors"} == {k: v for k, v in before.items() if k != "tensors"}


def _spoil(directory: Path, how: str, rng: random.Random) -> None:
    """Make the adapter in ``directory`` one that load_adapter must refuse once the adapter is injected."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = rng.choice(sorted(k for k in tensors if "lora_A" in k))
    if how == "shape":
        config = json.loads((directory / "adapter_config.json").read_text())
        config["r"] += 1
        config["rank_pattern"], config["alpha_pattern"] = {}, {}
        (directory / "adapter_config.json").write_text(json.dumps(config))
    elif how == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path)


def _merged_model(rng: random.Random, dtype: torch.dtype) -> nn.Module:
    width = rng.choice([8, 16, 24])
    torch.manual_seed(rng.randrange(1 << 30))
    model = _Block(width, dtype)
    inject_lora(model, _random_adapter(rng, target_modules=list(PROJ)), "first")
    if rng.random() < 0.5:
        inject_lora(model, _random_adapter(rng, lora_bias=False, use_dora=False), "second")
    for p in model.parameters():  # LoRA biases start at 0: moved, so that merging changes the base biases too
        p.data.add_(0.05 * torch.randn(p.shape).to(p.dtype))
    merge_adapters(model, sorted(model.lora_configs)[:rng.randint(1, len(model.lora_configs))])
    return model


@pytest.mark.parametrize("how", ["shape", "missing", "dtype"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_failed_adapter_load_leaves_a_merged_model_exactly_as_it_was(tmp_path, how, dtype):
    """The injection unmerged every merged layer (its set_adapter) before the file's check failed, and the rollback
    left them unmerged: weights off by the unmerge's rounding, merged_adapters emptied."""
    rng = random.Random()
    model = _merged_model(rng, dtype)
    width = model.q_proj.in_features
    donor = inject_lora(_Block(width, dtype), _random_adapter(rng, lora_bias=False, use_dora=False))
    save_adapter(donor, tmp_path / "bad")
    _spoil(tmp_path / "bad", how, rng)
    x = torch.randn(3, width, dtype=dtype)
    with torch.no_grad():
        expected = model.eval()(x)
    before = _model_state(model)
    assert any(before["merged"].values())
    with pytest.raises(ValueError) as error:
        load_adapter(model, tmp_path / "bad", "third")
    assert "\n" not in str(error.value) and "adapter_model.safetensors" in str(error.value)
    _assert_same_state(before, _model_state(model))
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_good_adapter_on_a_merged_model_loads_as_on_the_model_unmerged_first(tmp_path):
    """Holding the merges while the file is checked changes nothing for a load that succeeds: the layers end up
    unmerged, as injecting the adapter leaves them, and the new adapter is the active one."""
    rng = random.Random()
    dtype = rng.choice([torch.bfloat16, torch.float32])
    seed = rng.randrange(1 << 30)
    merged, unmerged = _merged_model(random.Random(seed), dtype), _merged_model(random.Random(seed), dtype)
    unmerge_adapters(unmerged)
    donor = inject_lora(_Block(merged.q_proj.in_features, dtype), _random_adapter(rng))
    save_adapter(donor, tmp_path / "good")
    for model in (merged, unmerged):
        load_adapter(model, tmp_path / "good", "third")
    _assert_same_state(_model_state(unmerged), _model_state(merged))
    assert active_adapters(merged) == ["third"] and not any(layer.merged for _, layer in lora_layers(merged))


# ------------------------------------------------------------------------------ resume after a crashed re-save

STATE = {"config": {}, "tokens": 0, "elapsed_s": 0.0, "optimizer": {}, "scheduler": {}, "scaler": None, "rng": {}}


class Killed(BaseException):
    """The process dying mid-save (nothing after it runs, not even publish_directory's own recovery)."""


def _write_adapter(directory: Path) -> None:
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (directory / "adapter_config.json").write_text("{}", encoding="utf-8")


def _crash_after_moving_aside(monkeypatch, run: Path, step: int) -> None:
    """Re-save ``checkpoint-<step>`` and die once the old copy is moved aside: the renames out of the temp and the
    moved-aside names never happen."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".checkpoint-"):
            raise Killed
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace", replace)
        with pytest.raises(Killed):
            save_checkpoint(run, step, _write_adapter, {**STATE, "tag": "unfinished"})
    assert not (run / f"checkpoint-{step}").exists() and (run / f".checkpoint-{step}.old.tmp").is_dir()


@pytest.mark.parametrize("named", ["run", "checkpoint"])
def test_a_resume_brings_back_the_checkpoint_a_crashed_resave_moved_aside(monkeypatch, tmp_path, named):
    """The newest checkpoint, moved aside by a re-save that crashed, was skipped: the run resumed from the one
    before it (or, named directly, was "not a checkpoint") until a next save restored it."""
    steps = sorted(random.sample(range(1, 1000), random.randint(2, 4)))
    for step in steps:
        save_checkpoint(tmp_path, step, _write_adapter, {**STATE, "tag": f"step {step}"})
    _crash_after_moving_aside(monkeypatch, tmp_path, steps[-1])
    resume = read_resume(tmp_path if named == "run" else tmp_path / f"checkpoint-{steps[-1]}")
    assert resume.checkpoint == tmp_path / f"checkpoint-{steps[-1]}"
    assert resume.state["tag"] == f"step {steps[-1]}" and resume.state["step"] == steps[-1]
    assert not (tmp_path / f".checkpoint-{steps[-1]}.old.tmp").exists()
    for step in steps:  # every checkpoint whole, as its manifest says
        assert load_state(tmp_path / f"checkpoint-{step}")["tag"] == f"step {step}"


# ------------------------------------------------------------------------------- --eval-steps without eval data

def _parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_the_demo_evaluates_every_50_steps_unless_the_user_sets_eval_steps():
    demo = _parse()
    assert demo.eval_steps is None and demo.eval_interval() == DEMO_DEFAULTS["eval_steps"] == 50
    assert _parse("--eval-steps", "50").eval_steps == 50 and _parse("--eval-steps", "0").eval_interval() == 0
    assert _parse("--data", "d.jsonl").eval_steps == 0 == TrainConfig().eval_interval()
    assert TrainConfig.from_dict(demo.to_dict()) == demo  # a resumed demo run keeps the demo's default


def test_an_eval_steps_set_without_evaluation_data_is_refused_in_one_line(tiny_config):
    """--eval-steps N with --val-fraction 0 and no --val-data trained on and silently never evaluated."""
    n = random.randint(1, 5)
    config = dataclasses.replace(tiny_config, eval_steps=n, val_fraction=0.0, max_steps=2)
    message = (f"--eval-steps {n} asks for evaluations, but the run has no evaluation data (--val-fraction is 0 and "
               f"there is no --val-data); pass --val-data FILE or a --val-fraction above 0, or --eval-steps 0")
    with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
        run_train(config, log=lambda _: None)
    assert not Path(config.output_dir).exists()


def test_an_eval_steps_in_a_config_file_without_evaluation_data_exits_2(tiny_config, tmp_path, capsys):
    """When --max-len leaves no validation example a response token, the error says so."""
    long_prompt = " ".join(["clause"] * 1000)
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": long_prompt, "completion": "short"}) + "\n")
    toml = tmp_path / "run.toml"
    toml.write_text(f"eval_steps = 3\nval_data = {json.dumps(str(val))}\n")
    code = main(["train", "--config", str(toml), "--model", tiny_config.model, "--data", tiny_config.data,
                 "--max-len", str(tiny_config.max_len), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("nf4lora train: error: --eval-steps 3 asks for evaluations, but the run has no evaluation "
                          f"data (--max-len {tiny_config.max_len} leaves all 1 validation examples without response "
                          "tokens)")


def test_the_demos_eval_steps_without_evaluation_data_still_trains(tiny_config):
    """The demo's own eval_steps (None) is a default: --val-fraction 0 simply leaves the run without evaluations."""
    config = dataclasses.replace(tiny_config, eval_steps=None, val_fraction=0.0, max_steps=1, max_new_tokens=0)
    assert run_train(config, log=lambda _: None)["eval"] is None


# ------------------------------------------------------------------------------------ pickled optimizer objects

def _steps(params, optimizer, count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        optimizer.step()


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("kind", ["adamw", "paged", "paged-partly-out"])
def test_torch_save_of_the_optimizer_object_round_trips_exactly(kind, bits):
    """torch.save(optimizer) raised "Cannot save multiple tensors or storages that view the same data as different
    types" (each state's fields are typed views of one byte buffer); torch.optim.AdamW objects save fine."""
    _check_torch_save_round_trip(kind, bits, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("kind", ["adamw", "paged-partly-out"])
def test_torch_save_of_the_optimizer_object_round_trips_exactly_on_a_gpu(kind, bits):
    """On a GPU a paged optimizer's pages kept in host memory must come back pinned, and every step after the load
    equal the uninterrupted run's."""
    _check_torch_save_round_trip(kind, bits, "cuda")


def _check_torch_save_round_trip(kind: str, bits: int, device: str) -> None:
    rng = random.Random()
    torch.manual_seed(rng.randrange(1 << 30))
    params = [nn.Parameter(torch.randn(rng.randint(1, 3000)).to(device, rng.choice([torch.float32, torch.bfloat16])))
              for _ in range(rng.randint(2, 4))]
    options = dict(lr=10 ** rng.uniform(-3, -1), weight_decay=rng.choice([0.0, 0.1]), optim_bits=bits,
                   min_8bit_size=rng.choice([0, 512]))
    if kind == "adamw":
        optimizer = AdamW(params, **options)
    else:
        budget = None if kind == "paged" else rng.randrange(0, 8192)
        optimizer = PagedAdamW(params, page_bytes=rng.choice([2048, 4096]), gpu_budget_bytes=budget, **options)
    _steps(params, optimizer, rng.randint(1, 3), seed=1)
    buffer = io.BytesIO()
    torch.save({"params": params, "optimizer": optimizer}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded["optimizer"]) is type(optimizer)
    if kind == "paged-partly-out" and device == "cuda":
        pages = [page for page in loaded["optimizer"]._pages() if not page.resident]
        assert all(page.buffer.is_pinned() for page in pages)
    _steps(params, optimizer, 3, seed=2)
    _steps(loaded["params"], loaded["optimizer"], 3, seed=2)
    for ours, theirs in zip(params, loaded["params"], strict=True):
        assert torch.equal(ours, theirs)
    saved, again = optimizer.state_dict(), loaded["optimizer"].state_dict()
    for index, entry in saved["state"].items():
        assert entry.keys() == again["state"][index].keys()
        assert all(torch.equal(tensor, again["state"][index][name]) for name, tensor in entry.items())


# ------------------------------------------------------------------------------------------ quantize's double_quant

ENTRIES = {"nf4": quantize,
           "kernels-reference": lambda *a, **k: _in_mode("reference", *a, **k),
           "kernels-triton": lambda *a, **k: _in_mode("triton", *a, **k)}


def _in_mode(mode: str, *args, **kwargs):
    with use_kernels(mode):
        return kernels_quantize(*args, **kwargs)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, np.int64(1), torch.tensor(True), [True]],
                         ids=lambda v: type(v).__name__)
def test_quantize_refuses_a_double_quant_that_is_not_a_bool(entry, value):
    """quantize(w, double_quant="no") double-quantized: any truthy value switched it on."""
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match=f"^double_quant={re.escape(repr(value))} .* is not a bool; valid: True, "
                                        f"False$"):
        ENTRIES[entry](w, double_quant=value)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_quantize_takes_numpy_bools_as_bools(entry):
    w = torch.randn(random.randint(1, 6), 128)
    for flag in (True, False):
        q, expected = ENTRIES[entry](w, double_quant=np.bool_(flag)), quantize(w, double_quant=flag)
        assert q.state.double_quant is flag and torch.equal(q.packed, expected.packed)
        assert torch.equal(q.state.absmax, expected.state.absmax)
