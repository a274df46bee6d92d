"""Fuzz audit of Llama.forward's features beyond plain logits: packed examples (the trainer's --packing inputs)
against transformers running each example alone, gradient checkpointing against the same model without it, a
left-padded KV cache filled over several calls against transformers' full forward, and the inputs found accepted
although malformed (silently wrong numbers) or refused with a traceback from deep inside."""

from __future__ import annotations

import pytest
import torch

from nf4lora.lora import LoraConfig, inject_lora
from nf4lora.model import load_model
from nf4lora.trainer.data import Example, collate

from .conftest import rel_err
from .test_llama import FP32_REL
from .test_model_audit import _assert_one_line

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(checkpoints):
    """(transformers' model, ours) on the same fp32 checkpoint."""
    path = checkpoints("gqa")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_model(
        path, dtype=torch.float32)


def _random_examples(gen: torch.Generator, rows: int) -> list[list[list[int]]]:
    """rows lists of 1-4 token lists, 1-9 tokens each."""
    def example():
        return torch.randint(3, 96, (int(torch.randint(1, 10, (), generator=gen)),), generator=gen).tolist()
    return [[example() for _ in range(int(torch.randint(1, 5, (), generator=gen)))] for _ in range(rows)]


def _packed_batch(rows: list[list[list[int]]]):
    """The trainer's packed batch: one row of concatenated examples each, right-padded (segment 0)."""
    examples = [Example(sum(row, []), sum(row, []), tuple(len(e) for e in row)) for row in rows]
    return collate(examples, pad_id=0, packed=True)


@pytest.mark.parametrize("seed", range(3))
def test_packed_rows_as_the_trainer_builds_them_match_each_example_run_alone_in_transformers(pair, seed):
    reference, ours = pair
    rows = _random_examples(torch.Generator().manual_seed(seed), rows=3)
    batch = _packed_batch(rows)
    with torch.no_grad():
        got = ours(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids)
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                alone = reference(torch.tensor([example])).logits[0]
                assert rel_err(got[r, start:start + len(example)], alone) < FP32_REL
                start += len(example)


def test_a_segment_id_that_comes_back_later_starts_a_new_example(pair):
    # packers that label examples 0, 1, 0, 1, ... : the third example attended to the first (same id) while its
    # positions restarted at 0, so its logits were neither those of it alone nor of the two joined
    reference, ours = pair
    a, b, c = (torch.randint(3, 96, (1, n)) for n in (4, 3, 5))
    segments = torch.tensor([[0] * 4 + [1] * 3 + [0] * 5])
    with torch.no_grad():
        got = ours(torch.cat([a, b, c], dim=1), segment_ids=segments)
        assert rel_err(got[:, 7:], reference(c).logits) < FP32_REL


@pytest.mark.parametrize(("quantization", "dropout"), [(None, 0.0), ("nf4", 0.0), (None, 0.1)])
def test_gradient_checkpointing_keeps_loss_and_every_gradient_with_lora_and_packing(checkpoints, quantization, dropout):
    model = load_model(checkpoints("gqa"), dtype=torch.float32, quantization=quantization)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: random values make every gradient reach the inputs
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = _packed_batch(_random_examples(torch.Generator().manual_seed(7), rows=2))

    def loss_and_grads(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(0)  # the same dropout masks; the recomputation must replay them
        logits = model(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (plain_loss, plain), (loss, recomputed) = loss_and_grads(False), loss_and_grads(True)
    assert plain and plain.keys() == recomputed.keys()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static_slots"])
def test_left_padded_cache_filled_in_chunks_with_holes_matches_transformers_full_forward(pair, static):
    reference, ours = pair
    ids = torch.randint(3, 96, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, :4], mask[1, :1], mask[2, 9] = 0, 0, 0  # left padding, and a hole in a later chunk
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = reference(ids, attention_mask=mask, position_ids=positions).logits
        cache = ours.new_cache(3, 16)
        chunks = []
        for start, end in ((0, 5), (5, 6), (6, 11), (11, 13)):
            slots = torch.arange(start, end) if static else None
            chunks.append(ours(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                               cache=cache, cache_position=slots))
    real = mask.bool()
    assert rel_err(torch.cat(chunks, dim=1)[real], full[real]) < FP32_REL


def test_an_integer_4d_mask_is_refused_not_added_to_the_scores(pair):
    # SDPA adds a non-bool mask: 0/1 integers became +0/+1 on the scores, so nothing was masked (transformers fails
    # inside SDPA instead)
    _, ours = pair
    causal = torch.ones(5, 5, dtype=torch.long).tril()[None, None]
    with pytest.raises(ValueError, match=r"4D attention_mask must be bool .* or additive float, got torch.int64"):
        ours(torch.randint(3, 96, (1, 5)), attention_mask=causal)


@pytest.mark.parametrize(("kwargs", "message"), [
    # accepted before: (B, 1) broadcast one position over all four tokens, silently wrong logits
    ({"position_ids": torch.zeros(2, 1, dtype=torch.long)}, r"position_ids must be \(B, T\)=\(2, 4\) or \(1, 4\), "
                                                            r"got \(2, 1\)"),
    # refused before by a broadcasting RuntimeError deep in RoPE
    ({"position_ids": torch.arange(4)}, r"position_ids must be .* got \(4,\)"),
    ({"position_ids": torch.zeros(2, 5, dtype=torch.long)}, r"position_ids must be .* got \(2, 5\)"),
    ({"attention_mask": torch.ones(2, 1, 4, 5, dtype=torch.bool)},
     r"4D attention_mask must be \(B or 1, 1 or heads, T, T\) with B=2, T=4, got \(2, 1, 4, 5\)"),
])
def test_malformed_positions_and_masks_are_refused_in_one_line(pair, kwargs, message):
    _, ours = pair
    with pytest.raises(ValueError, match=message) as error:
        ours(torch.randint(3, 96, (2, 4)), **kwargs)
    _assert_one_line(error)


@pytest.mark.parametrize(("slots", "message"), [
    # before: an expand RuntimeError, an IndexError from index_copy_, an AttributeError on a list, a dtype error
    (torch.arange(3), r"cache_position must be a \(4,\) int64 tensor of cache slots, got \(3,\) torch.int64"),
    (torch.arange(6, 10), r"cache_position 9 is out of range; valid: 0 to 7"),
    (torch.arange(-1, 3), r"cache_position -1 is out of range; valid: 0 to 7"),
    ([0, 1, 2, 3], r"cache_position must be .* got a list"),
    (torch.arange(4.0), r"cache_position must be .* got \(4,\) torch.float32"),
])
def test_bad_cache_positions_are_refused_in_one_line(pair, slots, message):
    _, ours = pair
    with pytest.raises(ValueError, match=message) as error:
        ours(torch.randint(3, 96, (2, 4)), cache=ours.new_cache(2, 8), cache_position=slots)
    _assert_one_line(error)
