"""Adapters on disk in peft's format, both directions.

A directory holds ``adapter_config.json`` (peft's ``LoraConfig`` keys, see
``LoraConfig.to_peft_dict``) and ``adapter_model.safetensors``, whose keys are peft's: the module
path under ``base_model.model.`` with the adapter name dropped::

    base_model.model.<path>.lora_A.weight             (r, in)
    base_model.model.<path>.lora_B.weight             (out, r)
    base_model.model.<path>.lora_magnitude_vector     (out,)        DoRA only
    base_model.model.<path>.base_layer.bias           (out,)        bias="lora_only" or "all"
    base_model.model.<other>.bias                                   bias="all"
    base_model.model.<module_to_save>.<param>                       modules_to_save

One table (``peft_key_map``) maps each of these keys to the model parameter it comes from; saving
reads it and loading requires the file's keys to equal it exactly, with equal shapes.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.lora.config import LoraConfig
from nf4lora.lora.model import delete_adapter, inject_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _is_plain_bias(name: str) -> bool:
    return name.endswith("bias") and not re.search(r"(^|\.)(lora_\w+|modules_to_save|original_module)\.", name)


def peft_key_map(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """peft key -> parameter of ``model`` for adapter ``adapter_name`` (the saved/loaded set)."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} is not injected; injected adapters: {sorted(configs)}")
    bias_mode = configs[adapter_name].bias
    a = re.escape(adapter_name)
    keys: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        key = None
        if m := re.fullmatch(rf"(.+)\.(lora_A|lora_B)\.{a}\.weight", name):
            key = f"{m[1]}.{m[2]}.weight"
        elif m := re.fullmatch(rf"(.+)\.lora_magnitude_vector\.{a}\.weight", name):
            key = f"{m[1]}.lora_magnitude_vector"
        elif m := re.fullmatch(rf"(.+)\.modules_to_save\.{a}\.(.+)", name):
            key = f"{m[1]}.{m[2]}"
        elif _is_plain_bias(name) and (
            bias_mode == "all" or (bias_mode == "lora_only" and name.endswith(".base_layer.bias") and
                                   adapter_name in model.get_submodule(name[: -len(".base_layer.bias")]).lora_A)
        ):
            key = name
        if key is not None:
            keys[PEFT_PREFIX + key] = param
    return keys


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors ``save_adapter`` writes, under peft's keys (detached, contiguous copies)."""
    return {k: p.detach().contiguous().clone() for k, p in peft_key_map(model, adapter_name).items()}


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in peft's format (loads with
    ``peft.PeftModel.from_pretrained`` on the matching transformers model)."""
    os.makedirs(directory, exist_ok=True)
    tensors = adapter_state_dict(model, adapter_name)  # raises for an unknown adapter
    config = model.lora_configs[adapter_name]
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    save_file({k: v.cpu() for k, v in tensors.items()}, weights_path, metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config.to_peft_dict(base_model_name_or_path), f, indent=2, sort_keys=True)


def read_adapter_config(directory: str | os.PathLike, lora_dtype: torch.dtype = torch.float32) -> LoraConfig:
    """The ``LoraConfig`` stored in ``directory/adapter_config.json`` (peft's or ours)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; expected a peft adapter directory with {CONFIG_NAME}")
    with open(path) as f:
        try:
            values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); expected peft's {CONFIG_NAME}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}; expected peft's {CONFIG_NAME}, an object")
    return LoraConfig.from_peft_dict(values, lora_dtype=lora_dtype)


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Inject adapter ``adapter_name`` as configured in ``directory`` and load its weights; returns ``model``.

    The file's keys must equal the ones the injected adapter expects (``peft_key_map``) and every
    shape must match; otherwise a ValueError names the missing and unexpected keys (or the shape)
    and the model is left as it was. The adapter becomes the active one.
    """
    config = read_adapter_config(directory, lora_dtype)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; expected peft's {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    inject_lora(model, config, adapter_name)
    try:
        expected = peft_key_map(model, adapter_name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
        for key, param in expected.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{path}: key {key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}"
                )
    except ValueError:
        delete_adapter(model, adapter_name)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        raise
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return model
