"""Tiny random Llama checkpoints written by transformers itself, shared by the model tests.

Each variant is built once per session. intermediate_size is a multiple of 64 because bitsandbytes' CPU 4-bit
matmul reshapes absmax per row and needs in_features divisible by the blocksize.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "gqa": {},
    "mha_bias": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    # head_dim 16 at theta 5e5: wavelengths 6.3, 32, 167, ... put one frequency in each of llama3's kept (< 64 / 4),
    # blended ([16, 64]) and divided (> 64) bands
    "llama3": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear_rope": dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "sharded": dict(num_hidden_layers=3),
}


def hf_model(**overrides):
    """A seeded random transformers LlamaForCausalLM (fp32, eval) with BASE + overrides."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    # transformers initializes norms to ones; random norms catch a missed or mis-placed scale.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{variant: directory} of transformers-saved safetensors checkpoints (lazily built)."""
    root = tmp_path_factory.mktemp("ckpt")
    built: dict[str, str] = {}

    def get(variant: str) -> str:
        if variant not in built:
            model = hf_model(**VARIANTS[variant])
            out = root / variant
            kwargs = {"max_shard_size": "60KB"} if variant == "sharded" else {}
            model.save_pretrained(out, **kwargs)
            built[variant] = str(out)
        return built[variant]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
