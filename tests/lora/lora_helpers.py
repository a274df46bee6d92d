"""Builders shared by the LoRA tests: a tiny random Llama, peft-side helpers (no network)."""

from __future__ import annotations

import copy
import warnings

import torch


def tiny_llama(bias: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2,
               hidden: int = 40, intermediate: int = 72):
    """A ``transformers.LlamaForCausalLM`` with random (optionally biased) weights: 2 layers with ragged sizes
    (hidden 40, mlp 72, vocab 97) by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    if bias:
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def peft_model(base, adapter_name: str = "default", **config):
    """peft's LoRA model on a deep copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), LoraConfig(**config), adapter_name=adapter_name)


def peft_from_pretrained(base, directory, adapter_name: str = "default"):
    """``peft.PeftModel.from_pretrained`` on a deep copy of ``base``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), directory, adapter_name=adapter_name)


def perturb_trainables(model, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor off its initial value, so that a dropped or misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def err_vs_magnitude(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor) -> float:
    """max |actual - expected| / max magnitude, in float64.

    `magnitude` is the same computation on the absolute values of every operand, which bounds the sum of the
    absolute terms behind each output: the scale that float rounding errors are relative to. Unlike `rel_err`,
    this does not blow up when the terms cancel (a one-element output can be far smaller than its terms).
    """
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / magnitude.double().abs().max().clamp_min(1e-30)).item()


class OneLayer(torch.nn.Module):
    """The smallest model peft accepts: one linear layer named ``proj``."""

    def __init__(self, proj: torch.nn.Module, loaded_in_4bit: bool = False) -> None:
        super().__init__()
        self.proj = proj
        # peft picks its bitsandbytes LoRA class only for models flagged as 4-bit (as transformers flags them).
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def copy_lora_weights(peft_model, ours) -> None:
    """Give every LoRA parameter of our model the value of peft's of the same name (peft names them as we do)."""
    theirs = dict(peft_model.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(theirs[name])


def copy_adapter_from_peft(peft_layer, our_layer, adapter: str = "default") -> None:
    """Give our LoraLinear the LoRA (and DoRA magnitude) weights of a peft LoRA layer."""
    with torch.no_grad():
        our_layer.lora_A[adapter].weight.copy_(peft_layer.lora_A[adapter].weight)
        our_layer.lora_B[adapter].weight.copy_(peft_layer.lora_B[adapter].weight)
        if adapter in peft_layer.lora_magnitude_vector:
            our_layer.lora_magnitude_vector[adapter].weight.copy_(peft_layer.lora_magnitude_vector[adapter].weight)


def bnb_linear4bit(linear: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64):
    """bitsandbytes ``Linear4bit`` (NF4, double-quantized) holding ``linear``'s weight, quantized on the CPU."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=blocksize, compress_statistics=True)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return q.to("cpu")  # quantizes


def bnb_dequantized(q) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def lora_module_names(model: torch.nn.Module) -> set[str]:
    """Names of the LoRA-wrapped modules in our model or in a peft model (peft's prefix removed)."""
    from peft.tuners.lora import LoraLayer

    from nf4lora.lora import LoraLinear

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraLayer)):
            names.add(name.removeprefix("base_model.model."))
    return names


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def bnb_quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace every ``nn.Linear`` but ``lm_head`` by bitsandbytes ``Linear4bit`` in place; flag the model 4-bit."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, bnb_linear4bit(module, compute_dtype=compute_dtype))
    model.is_loaded_in_4bit = True
    return model
