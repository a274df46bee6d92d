"""A LoRA-injected Llama trained under ``torch.autocast`` (HF Trainer's bf16=True), with and without gradient
checkpointing, on a dense and an NF4 base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nf4lora.lora import LoraConfig, inject_lora
from nf4lora.model import Llama, LlamaConfig
from nf4lora.nf4.linear import quantize_linears

from .conftest import rel_err


def _lora_llama(nf4: bool, dtype: torch.dtype) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).to(dtype)
    if nf4:
        quantize_linears(model)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)
    return inject_lora(model, config).train()


def _step(model: Llama, autocast: bool, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Logits and the LoRA gradients of one step, backward outside autocast as HF Trainer runs it."""
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = checkpointing
    torch.manual_seed(3)  # the same dropout masks in every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids)
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    return {"logits": logits.detach(), **grads}


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_an_fp32_lora_llama_trains_under_autocast_with_and_without_checkpointing(nf4):
    model = _lora_llama(nf4, torch.float32)
    plain = _step(model, autocast=False, checkpointing=False)
    cast, recomputed = _step(model, True, False), _step(model, True, True)
    for name in plain:  # recomputation replays the same bf16 ops on the same inputs
        torch.testing.assert_close(recomputed[name], cast[name], rtol=0, atol=0, msg=name)
    # bf16 through 2 layers, a dozen roundings per path: observed 1.5e-2 (logits) and cosine 0.996 (gradients)
    assert rel_err(cast["logits"], plain["logits"]) < 5e-2
    flat = lambda run: torch.cat([run[n].flatten() for n in plain if n != "logits"])  # noqa: E731
    assert F.cosine_similarity(flat(cast), flat(plain), dim=0) > 0.99


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_a_bf16_lora_llama_is_unchanged_by_autocast(nf4):
    model = _lora_llama(nf4, torch.bfloat16)
    plain, cast = _step(model, False, True), _step(model, True, True)
    for name in plain:
        torch.testing.assert_close(cast[name], plain[name], rtol=0, atol=0, msg=name)
