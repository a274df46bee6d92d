import math

import pytest
import torch

from nf4lora.trainer.data import IGNORE_INDEX, Example, collate
from nf4lora.trainer.loop import causal_lm_loss_sum, lr_lambda, model_inputs


def test_schedules_warm_up_linearly_then_follow_their_shape():
    for schedule in ("constant", "linear", "cosine"):
        f = lr_lambda(schedule, warmup_steps=4, total_steps=20)
        assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
        assert f(4) == pytest.approx(1.0)
    assert lr_lambda("constant", 0, 10)(9) == 1.0
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("cosine", 0, 10)(10) == pytest.approx(0.0, abs=1e-12)


def test_loss_sum_ignores_masked_labels_and_shifts_by_one():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    expected = -(logits[0, 0].log_softmax(-1)[3] + logits[0, 2].log_softmax(-1)[5])
    torch.testing.assert_close(causal_lm_loss_sum(logits, labels), expected)


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    """Token-weighted normalisation: splitting a batch of unequal lengths does not change the gradient."""
    from nf4lora.lora import LoraConfig, inject_lora
    from nf4lora.model import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2))
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    rows = [Example([1, 5, 6, 7, 8, 9], [IGNORE_INDEX, 5, 6, 7, 8, 9]), Example([1, 4], [IGNORE_INDEX, 4]),
            Example([1, 10, 11], [IGNORE_INDEX, IGNORE_INDEX, 11])]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batches):
        model.zero_grad()
        targets = sum(b.num_targets() for b in batches)
        for b in batches:
            (causal_lm_loss_sum(model(**model_inputs(b)), b.labels) / targets).backward()
        return [p.grad.clone() for p in params]

    whole = grads([collate(rows, 0, packed=False)])
    split = grads([collate(rows[:1], 0, packed=False), collate(rows[1:], 0, packed=False)])
    for a, b in zip(whole, split):
        # fp32, same math; padding only changes which masked rows exist, so only summation order differs.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not math.isclose(float(whole[0].abs().sum()), 0.0)
