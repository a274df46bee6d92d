"""A LoRA on the output head (peft's target_modules=["lm_head"]) runs in nf4lora's own Llama: forward, sampling."""

import torch

from nf4lora.lora import LoraConfig, inject_lora
from nf4lora.model import generate, load_model


def test_a_lora_on_lm_head_runs_forward_and_sampled_generation(checkpoints):
    model = inject_lora(load_model(checkpoints("gqa"), dtype=torch.float32),
                        LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)).eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
        model.lm_head.disable_adapters = True
        plain = model(ids)
        model.lm_head.disable_adapters = False
    assert logits.shape == (2, 7, model.config.vocab_size) and not torch.equal(logits, plain)
    out = generate(model, ids.tolist(), max_new_tokens=3, temperature=0.7, seed=1)
    assert out.shape == (2, 10)
