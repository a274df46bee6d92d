"""Metrics audit: what a run reports, recomputed independently from its inputs.

eval_loss is the token-weighted NLL of the held-out records (each scored alone, unpadded and unpacked, through the
saved adapter on a freshly loaded 4-bit base); the first step's loss and grad_norm are recomputed from the seeded
initial adapter on the micro-batches the data order names; eval_ppl is exp(eval_loss) whatever its size."""

import dataclasses
import json
import math
import random

import torch

from nf4lora.lora import load_adapter
from nf4lora.model import load_model, load_tokenizer
from nf4lora.trainer.corpus import legal_clauses
from nf4lora.trainer.data import IGNORE_INDEX, Example, epoch_seed, pack
from nf4lora.trainer.job import prepare, run_train
from nf4lora.trainer.metrics import perplexity, read_metrics

TEMPLATES = ("### Clause:\n{prompt}\n\n### Summary:\n", "{prompt}", "Q: {prompt} A:")


def random_records(rng, record_format, n):
    """n records of ``record_format`` with short prompts, so that most survive a small --max-len."""
    records = []
    for clause in legal_clauses(n, seed=rng.randrange(10_000)):
        prompt, completion = clause["prompt"][:rng.randrange(5, 80)], clause["completion"]
        if record_format == "text":
            records.append({"text": f"{prompt} {completion}"})
        elif record_format == "prompt-completion":
            records.append({"prompt": prompt, "completion": completion})
        else:
            records.append({"instruction": prompt, "input": rng.choice(["", "  ", clause["prompt"][-30:]]),
                            "output": completion})
    return records


def token_ids(tokenizer, record, template, max_len):
    """(input ids, labels) as the README defines them: BOS + templated prompt (masked) + response + EOS."""
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    if "text" in record:
        prompt, response = None, record["text"]
    elif "prompt" in record:
        prompt, response = record["prompt"], record["completion"]
    else:
        extra = record["input"]
        prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        response = record["output"]
    prompt_ids = encode(template.format(prompt=prompt)) if prompt is not None else []
    ids = [tokenizer.bos_id] + prompt_ids + encode(response) + [tokenizer.eos_id]
    labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + ids[1 + len(prompt_ids):]
    return ids[:max_len], labels[:max_len]


def trained(labels):
    return any(label != IGNORE_INDEX for label in labels[1:])


def nll_sum(model, ids, labels):
    """(summed next-token NLL as a 0-d float32 tensor, number of targets) of one example scored alone."""
    logp = model(input_ids=torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return -logp[keep].gather(1, targets[keep][:, None]).sum(), int(keep.sum())


def held_out(n, fraction, seed):
    """(train, validation) record indices of the documented seeded split."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = set(order[:min(n - 1, max(1, round(n * fraction)))])
    return [i for i in range(n) if i not in val], sorted(val)


def first_step_rows(rows, config):
    """The rows of the first optimizer step: micro-batches 0 .. grad_accum-1 of the seeded epoch orders."""
    per_epoch = math.ceil(len(rows) / config.micro_batch)
    chosen = []
    for m in range(config.grad_accum):
        epoch, position = divmod(m, per_epoch)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch)))
        chosen += [rows[i] for i in order[position * config.micro_batch:(position + 1) * config.micro_batch]]
    return chosen


def random_run(rng, tiny_config, tmp_path):
    """A random one-step fp32 run without dropout; returns (config, records, record format)."""
    record_format = rng.choice(["text", "prompt-completion", "instruction"])
    records = random_records(rng, record_format, rng.randrange(8, 20))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = dataclasses.replace(
        tiny_config, data=str(data), max_steps=1, micro_batch=rng.randrange(1, 5), grad_accum=rng.randrange(1, 4),
        max_len=rng.choice([96, 160, 256]), val_fraction=rng.choice([0.2, 0.4]), packing=rng.random() < 0.5,
        template=rng.choice(TEMPLATES), lora_dropout=0.0, seed=rng.randrange(1000), max_new_tokens=0,
        gradient_checkpointing=rng.random() < 0.5, max_grad_norm=rng.choice([0.0, 0.3]))
    return config, records, record_format


def test_a_random_run_reports_the_eval_loss_and_first_step_recomputed_by_hand(tiny_config, tmp_path):
    rng = random.Random()
    config, records, _ = random_run(rng, tiny_config, tmp_path)
    initial = prepare(dataclasses.replace(config, output_dir=str(tmp_path / "initial"))).model
    summary = run_train(config, log=lambda _: None)
    metrics = read_metrics(config.output_dir)
    tokenizer = load_tokenizer(config.model)
    train_ids, val_ids = held_out(len(records), config.val_fraction, config.seed)

    val = [e for e in (token_ids(tokenizer, records[i], config.template, config.max_len) for i in val_ids)
           if trained(e[1])]
    model = load_model(config.model, quantization="nf4", dtype=torch.float32, device="cpu")
    load_adapter(model, config.output_dir)
    model.eval()
    with torch.no_grad():
        scored = [nll_sum(model, ids, labels) for ids, labels in val]
    evals = [r for r in metrics if "eval_loss" in r]
    if val:
        expected = sum(float(s) for s, _ in scored) / sum(n for _, n in scored)
        assert math.isclose(evals[-1]["eval_loss"], expected, rel_tol=1e-5), (config, expected)
        assert math.isclose(evals[-1]["eval_ppl"], math.exp(expected), rel_tol=1e-5)
        assert summary["eval"]["eval_loss"] == evals[-1]["eval_loss"]
    else:
        assert evals == [] and summary["eval"] is None

    examples = [Example(*e) for e in (token_ids(tokenizer, records[i], config.template, config.max_len)
                                      for i in train_ids) if trained(e[1])]
    rows = first_step_rows(pack(examples, config.max_len) if config.packing else examples, config)
    initial.train()
    parts = [nll_sum(initial, row.input_ids[start:start + length], row.labels[start:start + length])
             for row in rows for start, length in zip(
                 [sum(row.segments()[:k]) for k in range(len(row.segments()))], row.segments())]
    loss = torch.stack([s for s, _ in parts]).sum() / sum(n for _, n in parts)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in initial.parameters() if p.requires_grad])).item()
    first = next(r for r in metrics if "loss" in r)
    assert math.isclose(first["loss"], loss.item(), rel_tol=1e-5), config
    assert math.isclose(first["grad_norm"], grad_norm, rel_tol=1e-4), config  # before clipping
    assert first["tokens"] == sum(len(row.input_ids) for row in rows) == summary["tokens"]
    assert summary["first_loss"] == first["loss"]


def test_eval_ppl_is_exp_of_eval_loss_however_large():
    """It was capped at exp(50): a diverged run's perplexity read e^50 whatever its loss, and an infinite eval loss
    (written null) came with a finite perplexity."""
    loss = random.uniform(50.5, 700.0)
    assert math.isclose(perplexity(loss), math.exp(loss), rel_tol=1e-12)
    assert perplexity(float("inf")) == math.inf and perplexity(random.uniform(710, 1e6)) == math.inf


def test_validation_examples_that_max_len_empties_are_reported(tiny_config, tmp_path):
    """They were dropped without a word (training examples get a note), so eval_loss silently covered fewer
    records than were held out, or, with all of them dropped, the run had no evaluation and said nothing."""
    rng = random.Random()
    clauses = legal_clauses(6, seed=rng.randrange(10_000))
    short = [{"prompt": c["prompt"][:20], "completion": c["completion"]} for c in clauses[:3]]
    long = [{"prompt": c["prompt"] * 8, "completion": c["completion"]} for c in clauses[3:]]
    kept = rng.randrange(2)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in short[:kept] + long))
    lines = []
    summary = run_train(dataclasses.replace(tiny_config, val_data=str(val), max_len=192, max_steps=1,
                                            max_new_tokens=0), log=lines.append)
    notes = [line for line in lines if "validation examples dropped" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {len(long)} validation examples"), lines
    assert "--max-len 192" in notes[0]
    assert (summary["eval"] is None) == (kept == 0)
    assert ("no evaluation" in notes[0]) == (kept == 0)
