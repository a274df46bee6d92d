"""Fuzz audit of a training step's numerics: the Trainer on random tiny Llamas and random settings against an
independent fp32 loop with transformers' LlamaForCausalLM, peft's LoRA and torch.optim.AdamW (the same checkpoint,
the same initial A and B), and the claims of ``loop.py``'s docstring: the token-weighted loss makes any
micro-batch split of the same rows (and packing them) the same step, and the frozen base gets no gradient."""

import dataclasses
import math
import random

import pytest
import torch

from nf4lora.lora import adapter_state_dict
from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.data import IGNORE_INDEX, BatchPlan, Example, pack
from nf4lora.trainer.job import _inject, load_base, make_optimizer, prepare_for_kbit_training
from nf4lora.trainer.loop import Trainer, lr_lambda

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown with a failure, to replay it
    return random.Random(seed)


def random_base(rng, out):
    """A random tiny Llama written by transformers as fp32 safetensors; returns its vocabulary size."""
    heads = rng.choice([2, 4])
    config = transformers.LlamaConfig(
        vocab_size=rng.randrange(100, 300), hidden_size=rng.choice([32, 64]), intermediate_size=rng.choice([48, 64]),
        num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads,
        num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]), max_position_embeddings=64,
        tie_word_embeddings=rng.random() < 0.3)
    torch.manual_seed(rng.randrange(2**31))
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(out)
    return config.vocab_size


def random_rows(rng, vocab, n, max_len):
    """Examples as the data pipeline makes them: the first label (BOS) and a random prompt masked, >= 1 target."""
    rows = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(2, max_len + 1))]
        masked = rng.randrange(1, len(ids))
        rows.append(Example(ids, [IGNORE_INDEX] * masked + ids[masked:]))
    return rows


def random_config(rng, base, steps, **fixed):
    values = dict(quantization=rng.choice(["none", "nf4"]), blocksize=rng.choice([32, 64]),
                  double_quant=rng.random() < 0.5, lora_r=rng.choice([1, 2, 4]), lora_alpha=rng.choice([4.0, 7.5]),
                  target_modules=",".join(rng.sample(LINEARS, rng.randrange(1, len(LINEARS) + 1))),
                  lr=rng.choice([1e-3, 1e-2]), weight_decay=rng.choice([0.0, 0.1, 0.5]),
                  max_grad_norm=rng.choice([0.0, 0.3, 1e-4]), schedule=rng.choice(["constant", "linear", "cosine"]),
                  warmup_steps=rng.randrange(steps + 1), grad_accum=rng.randrange(1, 4),
                  micro_batch=rng.randrange(1, 4), max_len=rng.randrange(4, 16), packing=rng.random() < 0.4,
                  optimizer=rng.choice(["adamw-32bit", "paged-adamw-32bit"]),
                  gradient_checkpointing=rng.random() < 0.5, seed=rng.randrange(1000))
    values.update(fixed)
    return TrainConfig(model=str(base), lora_dropout=0.0, dtype="fp32", device="cpu", max_steps=steps,
                       progress=False, **values)


def our_model(config):
    """The job's model: base (NF4 or dense) frozen, LoRA injected, then A and B perturbed by a fixed generator so
    that B is not zero and every LoRA weight has a gradient on step 1."""
    torch.manual_seed(config.seed)
    model = load_base(config.model, config, CPU, torch.float32)
    prepare_for_kbit_training(model, config.gradient_checkpointing)
    _inject(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def our_steps(config, model, plan, steps, total_micro_batches, tmp_path):
    """The metrics records of ``steps`` Trainer steps, with the job's optimizer and schedule."""
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.schedule, config.warmup_steps, steps))
    trainer = Trainer(config, model, optimizer, scheduler, plan, steps, tmp_path, CPU, lambda _: None,
                      total_micro_batches=total_micro_batches)
    return [trainer.train_step() for _ in range(steps)]


def bnb_dequantized(weight, blocksize, double_quant):
    """bitsandbytes' NF4 round trip of ``weight``: its codes and absmax, decoded by hand (its C++ CPU dequantizer
    mis-indexes absmax where a row is not a whole number of blocks, README)."""
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type="nf4")
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    nibbles = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()[:weight.numel()]
    return (state.code.float()[nibbles] * absmax.float()[torch.arange(weight.numel()) // blocksize]).view_as(weight)


def peft_model(config, adapter):
    """transformers' Llama (decoder linears replaced by their NF4 round trip when the run quantizes) with peft's
    LoRA holding ``adapter``."""
    model = transformers.LlamaForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    if config.quantization == "nf4":
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    module.weight.copy_(bnb_dequantized(module.weight, config.blocksize, config.double_quant))
    model = peft.get_peft_model(model, peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                       target_modules=config.target_modules.split(",")))
    assert not peft.set_peft_model_state_dict(model, adapter).unexpected_keys
    return model


def reference_loss_sum(model, batch):
    """Sum of next-token losses of a Batch, each packed example run alone as its own sequence (no segment mask)."""
    total = torch.zeros(())
    for row in range(batch.input_ids.shape[0]):
        segments = batch.segment_ids[row]
        spans = [segments == s for s in segments.unique().tolist() if s > 0] if batch.packed else [segments >= 0]
        for span in spans:
            ids, labels = batch.input_ids[row, span], batch.labels[row, span]
            logits = model(input_ids=ids[None]).logits[0].float()
            total = total + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX,
                                                              reduction="sum")
    return total


def reference_schedule(config, steps):
    """The documented schedule: warmup (s + 1) / (warmup + 1), then constant, linear or cosine decay to 0 at
    ``steps``."""
    def factor(s):
        if s < config.warmup_steps:
            return (s + 1) / (config.warmup_steps + 1)
        progress = (s - config.warmup_steps) / max(1, steps - config.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[config.schedule]
    return factor


def reference_steps(config, model, steps_batches):
    """torch.optim.AdamW (betas 0.9/0.999, eps 1e-8, decay on every LoRA weight) over the steps' micro-batches,
    each contributing sum(token losses) / the step's targets; clipping by the total norm of the LoRA gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, reference_schedule(config, len(steps_batches)))
    records = []
    for batches in steps_batches:
        targets = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        lr, loss = optimizer.param_groups[0]["lr"], 0.0
        for batch in batches:
            loss_sum = reference_loss_sum(model, batch)
            (loss_sum / targets).backward()
            loss += loss_sum.item() / targets
        norm = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))
        if config.max_grad_norm > 0:
            for p in params:
                p.grad.mul_(min(1.0, config.max_grad_norm / (norm + 1e-6)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        records.append({"loss": loss, "lr": lr, "grad_norm": norm})
    return records


def assert_same_run(ours, theirs, adapter, expected_adapter):
    """Losses, lr and pre-clip gradient norms per step to fp32 accuracy; LoRA weights to Adam's amplification of
    rounding (a near-zero gradient's sign decides a whole lr-sized move) relative to each tensor's size."""
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), f"step {step} {key}"
    assert adapter.keys() == expected_adapter.keys()
    for key, value in adapter.items():
        scale = float(expected_adapter[key].abs().max())
        torch.testing.assert_close(value, expected_adapter[key], rtol=0, atol=1e-3 * scale + 1e-7, msg=key)


def test_steps_equal_transformers_peft_and_torch_adamw(rng, tmp_path):
    """Random base (dense or NF4), targets, rank, lr, decay, clipping (down to tiny norms), schedule, warmup,
    grad_accum, micro-batch, packing and checkpointing; a last step that may take fewer micro-batches; 1-4 steps."""
    for case in range(5):
        base = tmp_path / f"base{case}"
        vocab = random_base(rng, base)
        steps = rng.randrange(1, 5)
        config = random_config(rng, base, steps)
        rows = random_rows(rng, vocab, rng.randrange(1, 10), config.max_len)
        rows = pack(rows, config.max_len) if config.packing else rows
        plan = BatchPlan(rows, config.micro_batch, config.seed, 0, config.packing)
        micro_batches = rng.randrange((steps - 1) * config.grad_accum + 1, steps * config.grad_accum + 1)
        model = our_model(config)
        reference = peft_model(config, adapter_state_dict(model))
        ours = our_steps(config, model, plan, steps, micro_batches, tmp_path)
        ga = config.grad_accum
        windows = [range(s * ga, min((s + 1) * ga, micro_batches)) for s in range(steps)]
        theirs = reference_steps(config, reference, [[plan.micro_batch_at(i) for i in w] for w in windows])
        assert_same_run(ours, theirs, adapter_state_dict(model), peft.get_peft_model_state_dict(reference))


def test_any_split_of_the_same_rows_and_packing_them_is_the_same_step(rng, tmp_path):
    """The token-weighted loss: micro-batch x grad_accum = 1x4, 2x2 and 4x1 over the same rows of unequal lengths
    and prompt masks, and the same rows packed into as few rows as fit, give the same losses, norms and adapter."""
    base = tmp_path / "base"
    vocab = random_base(rng, base)
    config = random_config(rng, base, 1, max_grad_norm=rng.choice([0.0, 1e-4]), lr=1e-2, packing=False)
    rows = random_rows(rng, vocab, 4, config.max_len)
    packed = pack(rows, config.max_len)
    runs = []
    for split, micro_batch, grad_accum in ((rows, 1, 4), (rows, 2, 2), (rows, 4, 1), (packed, len(packed), 1)):
        step_config = dataclasses.replace(config, micro_batch=micro_batch, grad_accum=grad_accum)
        plan = BatchPlan(split, micro_batch, config.seed, 0, split is packed)
        model = our_model(step_config)
        runs.append((our_steps(step_config, model, plan, 1, grad_accum, tmp_path), adapter_state_dict(model)))
    for records, adapter in runs[1:]:
        assert_same_run(records, runs[0][0], adapter, runs[0][1])


def test_the_frozen_base_gets_no_gradient_and_keeps_every_bit(rng, tmp_path):
    base = tmp_path / "base"
    vocab = random_base(rng, base)
    config = random_config(rng, base, 2, quantization="nf4", lr=5e-2, weight_decay=0.5)
    model = our_model(config)
    frozen = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
              if not t.requires_grad}
    plan = BatchPlan(random_rows(rng, vocab, 6, config.max_len), config.micro_batch, config.seed, 0, False)
    lora = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    our_steps(config, model, plan, 2, 2 * config.grad_accum, tmp_path)
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    for name, before in frozen.items():
        assert tensors[name].grad is None, name
        assert torch.equal(tensors[name], before), name
    assert all(not torch.equal(tensors[name], before) for name, before in lora.items())
