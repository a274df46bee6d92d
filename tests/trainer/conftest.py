"""Shared fixtures: a tiny Llama Hugging Face directory and a small legal-clause dataset, built on the spot."""

import json

import pytest
import torch

from nf4lora.trainer.config import TrainConfig
from nf4lora.trainer.corpus import legal_clauses, train_tokenizer
from nf4lora.trainer.job import run_train

TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def records():
    return legal_clauses(48, seed=3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, records):
    """config.json + model.safetensors (fp32) + tokenizer.model, the layout `--model` expects."""
    from nf4lora.model import Llama, LlamaConfig, save_pretrained

    out = tmp_path_factory.mktemp("tiny_model")
    train_tokenizer([r["prompt"] + " " + r["completion"] for r in records], out / "tokenizer.model", vocab_size=320)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig(vocab_size=vocab, **TINY_ARCH)), str(out))
    return out


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "clauses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, data_file, tmp_path):
    """A fast training config on the tiny model; override fields with dataclasses.replace."""
    return TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(tmp_path / "run"),
                       max_steps=6, micro_batch=4, grad_accum=2, lr=5e-3, max_len=192, val_fraction=0.1,
                       progress=False, max_new_tokens=8, dtype="fp32")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, data_file):
    """A finished one-step fp32 run on the tiny model (its adapter and run_config.json); tests only read it."""
    run = tmp_path_factory.mktemp("trained_run") / "run"
    run_train(TrainConfig(model=str(tiny_model_dir), data=str(data_file), output_dir=str(run), max_steps=1,
                          micro_batch=2, max_len=192, progress=False, max_new_tokens=0, dtype="fp32"),
              log=lambda _: None)
    return run
