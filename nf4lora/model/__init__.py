"""nf4lora.model: a Llama implementation that loads Hugging Face safetensors, quantizes on load, and generates."""

from .config import LlamaConfig
from .generate import filter_logits, generate, generate_stream, sample_next
from .llama import KVCache, Llama
from .loading import load_model, model_nbytes, save_pretrained, save_quantized
from .tokenizer import load_tokenizer

__all__ = [
    "KVCache",
    "Llama",
    "LlamaConfig",
    "filter_logits",
    "generate",
    "generate_stream",
    "load_model",
    "load_tokenizer",
    "model_nbytes",
    "sample_next",
    "save_pretrained",
    "save_quantized",
]
