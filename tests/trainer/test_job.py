import dataclasses
import json
import math

import pytest
import torch

from nf4lora.trainer.job import run_train
from nf4lora.trainer.loop import Trainer
from nf4lora.trainer.metrics import read_metrics


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def stop_after(step):
    def hook(trainer: Trainer, record):
        if record["step"] == step:
            trainer.request_stop()

    return hook


def test_training_lowers_the_loss_and_writes_the_run(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, max_steps=12, save_steps=5, eval_steps=6)
    summary = run_train(config, log=lambda _: None)
    run = tmp_path / "run"
    curve = losses(run)
    # From ~ln(320) = 5.77 nats; 12 steps of this tiny model reliably gain > 0.5 nats, noise is ~0.1 per step.
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.3
    for name in ("run_config.json", "metrics.jsonl", "summary.json", "adapter_config.json",
                 "adapter_model.safetensors", "checkpoint-5/trainer_state.pt",
                 "checkpoint-10/adapter_model.safetensors",
                 "checkpoint-12/trainer_state.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".checkpoint-*"))
    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and evals[1]["eval_ppl"] == pytest.approx(
        torch.tensor(evals[1]["eval_loss"]).exp().item(), rel=1e-6)
    assert summary["sample"]["completion"] is not None and not summary["interrupted"]


def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny_config, tmp_path):
    full = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "full"), max_new_tokens=0, micro_batch=2,
                               val_fraction=0.0, max_steps=5)
    run_train(full, log=lambda _: None)
    part = dataclasses.replace(full, output_dir=str(tmp_path / "part"))
    summary = run_train(part, on_step=stop_after(3), log=lambda _: None)
    assert summary["interrupted"] and summary["checkpoint"].endswith("checkpoint-3")
    assert len(losses(tmp_path / "part")) == 3 and len(losses(tmp_path / "full")) == 5
    run_train(dataclasses.replace(part, resume=str(tmp_path / "part")), log=lambda _: None)
    # Same machine, same kernels, same RNG streams: a resumed run is bit-identical, not merely close.
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_resume_with_a_different_rank_is_refused(tiny_config, tmp_path):
    from nf4lora.trainer.config import UsageError

    config = dataclasses.replace(tiny_config, max_steps=1, max_new_tokens=0)
    run_train(config, log=lambda _: None)
    with pytest.raises(UsageError, match="incompatible checkpoint, it was trained with lora_r=16 but this run has "
                                         "lora_r=8"):
        run_train(dataclasses.replace(config, lora_r=8, resume=config.output_dir), log=lambda _: None)


def test_packed_training_runs_and_counts_every_example(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, packing=True, max_steps=2, max_new_tokens=0, val_fraction=0.0)
    summary = run_train(config, log=lambda _: None)
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))


def test_peft_loads_the_adapter_and_matches_our_logits(tiny_config, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from nf4lora.lora import load_adapter
    from nf4lora.model import load_model

    config = dataclasses.replace(tiny_config, quantization="none", max_steps=3, max_new_tokens=0)
    run_train(config, log=lambda _: None)
    run = tmp_path / "run"
    base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(run)).eval()
    ours = load_adapter(load_model(str(tiny_model_dir), dtype=torch.float32), str(run)).eval()
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        actual = ours(ids)
    # Same fp32 weights and the same math; only the order of floating-point sums differs between implementations.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The adapter trained (B is no longer zero), so the comparison above is not base-vs-base.
    from nf4lora.lora import disable_adapters

    with torch.no_grad(), disable_adapters(ours):
        bare = ours(ids)
    assert (bare - actual).abs().max() > 1e-3


def test_cuda_oom_evicts_optimizer_state_and_retries_once(tiny_config, monkeypatch):
    from nf4lora.optim import PagedAdamW

    evicted = []
    monkeypatch.setattr(PagedAdamW, "evict", lambda self, nbytes: evicted.append(nbytes) or 0)
    calls = {"n": 0}
    real = Trainer._accumulate

    def flaky(self, batches, targets):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batches, targets)

    monkeypatch.setattr(Trainer, "_accumulate", flaky)
    summary = run_train(dataclasses.replace(tiny_config, max_steps=3, max_new_tokens=0), log=lambda _: None)
    assert summary["steps"] == 3 and len(evicted) == 1


def test_repeated_cuda_oom_fails_with_an_actionable_message(tiny_config, monkeypatch):
    from nf4lora.trainer.loop import TrainingOOM

    def always(self, batches, targets):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Trainer, "_accumulate", always)
    with pytest.raises(TrainingOOM, match=r"lower --micro-batch \(raise --grad-accum to keep the effective batch\)"):
        run_train(dataclasses.replace(tiny_config, max_steps=2, max_new_tokens=0), log=lambda _: None)


def test_run_config_records_the_resolved_settings(tiny_config, tmp_path):
    run_train(dataclasses.replace(tiny_config, max_steps=1, max_new_tokens=0), log=lambda _: None)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["lora_r"] == tiny_config.lora_r and saved["resolved_model"] == tiny_config.model


def test_fp16_compute_trains_with_a_loss_scaler(tiny_config, tmp_path):
    from nf4lora.trainer.checkpoint import load_state

    summary = run_train(dataclasses.replace(tiny_config, dtype="fp16", max_steps=2, max_new_tokens=0),
                        log=lambda _: None)
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in losses(tmp_path / "run"))
    assert load_state(tmp_path / "run" / "checkpoint-2")["scaler"]["scale"] > 0


def test_every_option_family_trains_together(tiny_config, tmp_path):
    """DoRA + rsLoRA on an FP4 base without double quant, 8-bit paged AdamW, cosine with warmup, weight decay,
    a regex target list, no gradient checkpointing: two finite steps and a reloadable adapter."""
    config = dataclasses.replace(tiny_config, use_dora=True, use_rslora=True, quantization="fp4", double_quant=False,
                                 blocksize=128, optimizer="paged-adamw-8bit", schedule="cosine", warmup_steps=1,
                                 weight_decay=0.01, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                 gradient_checkpointing=False, max_steps=2, max_new_tokens=2)
    summary = run_train(config, log=lambda _: None)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and summary["sample"] is not None
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))


def test_backward_runs_on_the_calling_thread_and_the_setting_is_restored(tiny_config, monkeypatch):
    import nf4lora.trainer.loop as loop

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(torch.autograd.is_multithreading_enabled())
            return grad

    real = loop.causal_lm_loss_sum
    monkeypatch.setattr(loop, "causal_lm_loss_sum", lambda logits, labels: real(Probe.apply(logits), labels))
    run_train(dataclasses.replace(tiny_config, max_steps=2, max_new_tokens=0), log=lambda _: None)
    assert seen and not any(seen)
    assert torch.autograd.is_multithreading_enabled()


def _same(a, b):
    """Exact equality of nested checkpoint states (tensors bit for bit, numpy RNG arrays element-wise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        return bool((a == b).all())
    return a == b


class Killed(BaseException):
    """The process dying after a step's metrics line is written (nothing in the trainer may catch it)."""


def kill_after(step):
    def hook(trainer: Trainer, record):
        if record["step"] == step:
            raise Killed(step)

    return hook


@pytest.mark.parametrize("changes, interrupt", [
    # Killed at step 5 with checkpoints every 2 steps: resume from checkpoint-4 must drop step 5's metrics line
    # and replay it. 8-bit paged AdamW (r=64 gives 4096-element LoRA weights, so some states really are 8-bit),
    # cosine with warmup, 3 steps per epoch, so checkpoint-4 lies inside the second epoch and the LR decay.
    (dict(optimizer="paged-adamw-8bit", lora_r=64, schedule="cosine", warmup_steps=2, micro_batch=8, max_steps=7,
          save_steps=2, lora_dropout=0.1, val_fraction=0.1), ("kill", 5)),
    # Ctrl-C after step 2 with fp16 compute: the dynamic loss scaler's growth tracker must survive it too.
    (dict(dtype="fp16", schedule="linear", warmup_steps=1, micro_batch=2, max_steps=5, val_fraction=0.0),
     ("stop", 2)),
], ids=["killed-paged-8bit-cosine-epoch2", "ctrl-c-fp16-scaler-linear"])
def test_resume_at_an_arbitrary_step_reproduces_the_whole_run_and_its_final_state(tiny_config, tmp_path, changes,
                                                                                   interrupt):
    """Interrupt a run (killed between checkpoints, or stopped as by Ctrl-C), resume it, and compare with an
    uninterrupted run: every metrics line (loss, lr, grad norm, epoch, tokens, eval loss), the final adapter and
    the final checkpoint's optimizer (paged, 8-bit), scheduler, loss-scaler and RNG states are identical. Catches
    a resume that forgets any one of them, even where the losses of a constant-LR, 32-bit run would not show it."""
    from safetensors.torch import load_file

    from nf4lora.trainer.checkpoint import load_state

    full = dataclasses.replace(tiny_config, output_dir=str(tmp_path / "full"), max_new_tokens=0, **changes)
    run_train(full, log=lambda _: None)
    part = dataclasses.replace(full, output_dir=str(tmp_path / "part"))
    how, step = interrupt
    if how == "kill":
        with pytest.raises(Killed):
            run_train(part, on_step=kill_after(step), log=lambda _: None)
        assert [r["step"] for r in read_metrics(tmp_path / "part") if "loss" in r] == list(range(1, step + 1))
    else:
        assert run_train(part, on_step=stop_after(step), log=lambda _: None)["interrupted"]
    run_train(dataclasses.replace(part, resume=part.output_dir), log=lambda _: None)

    def lines(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in read_metrics(run)]

    assert len(lines(tmp_path / "part")) >= full.max_steps and lines(tmp_path / "part") == lines(tmp_path / "full")
    assert _same(load_file(str(tmp_path / "part" / "adapter_model.safetensors")),
                 load_file(str(tmp_path / "full" / "adapter_model.safetensors")))
    final = f"checkpoint-{full.max_steps}"
    resumed, uninterrupted = load_state(tmp_path / "part" / final), load_state(tmp_path / "full" / final)
    if full.optimizer.endswith("8bit"):
        assert any(e["state1"].dtype == torch.uint8 for e in uninterrupted["optimizer"]["state"].values()
                   if "state1" in e)
    for key in ("step", "tokens", "optimizer", "scheduler", "scaler", "rng"):
        assert _same(resumed[key], uninterrupted[key]), key


def test_dtype_sets_the_compute_dtype_of_a_prequantized_base(tmp_path, tiny_model_dir):
    """A bitsandbytes-format checkpoint records bnb_4bit_compute_dtype; the trainer's and the commands' --dtype
    still decide what the NF4 layers compute in."""
    import argparse

    from nf4lora.model import load_model, save_quantized
    from nf4lora.trainer.commands import _load
    from nf4lora.trainer.config import TrainConfig
    from nf4lora.trainer.job import load_base

    saved = tmp_path / "bnb4"
    save_quantized(load_model(str(tiny_model_dir), quantization="nf4", compute_dtype=torch.bfloat16), str(saved))
    base = load_base(str(saved), TrainConfig(model=str(saved)), torch.device("cpu"), torch.float32)
    args = argparse.Namespace(model=str(saved), quantization="nf4", dtype="fp32", device="cpu", blocksize=64,
                              double_quant=True)
    for model in (base, _load(args)[0]):
        assert {m.compute_dtype for m in model.modules() if type(m).__name__ == "NF4Linear"} == {torch.float32}
