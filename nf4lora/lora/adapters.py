"""Adapters on disk in peft's format, both directions.

A directory holds ``adapter_config.json`` (peft's ``LoraConfig`` keys, see
``LoraConfig.to_peft_dict``) and ``adapter_model.safetensors``, whose keys are peft's: the module
path under ``base_model.model.`` with the adapter name dropped::

    base_model.model.<path>.lora_A.weight             (r, in)
    base_model.model.<path>.lora_B.weight             (out, r)
    base_model.model.<path>.lora_B.bias               (out,)        lora_bias=True only
    base_model.model.<path>.lora_magnitude_vector     (out,)        DoRA only
    base_model.model.<path>.base_layer.bias           (out,)        bias="lora_only" or "all"
    base_model.model.<other>.bias                                   bias="all"
    base_model.model.<module_to_save>.original_module.bias          bias="all", as peft saves them
    base_model.model.<module_to_save>.modules_to_save.bias          bias="all", as peft saves them
    base_model.model.<module_to_save>.<param>                       modules_to_save

One table (``peft_key_map``) maps each of these keys to the model parameter it comes from; saving
reads it and loading requires the file's keys to equal it exactly, with equal shapes. The one other
key loading accepts is a base weight that peft saved beside the adapter (``save_embedding_layers``:
``<path>.base_layer.weight`` of a targeted ``lm_head``) and that equals the model's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.files import publish_files
from nf4lora.jsonfile import read_json_object
from nf4lora.lora.config import LoraConfig
from nf4lora.lora.model import (
    active_adapters, delete_adapter, inject_lora, lora_layers, set_adapter, without_unmatched_entries,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PICKLE_NAME = "adapter_model.bin"
# a parameter name inside an adapter's own modules (its LoRA weights, DoRA magnitude or modules_to_save copy)
_ADAPTER_PART = re.compile(r"(^|\.)(lora_A|lora_B|lora_magnitude_vector|modules_to_save)\.")


def peft_key_map(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """peft key -> parameter of ``model`` for adapter ``adapter_name`` (the saved/loaded set)."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} is not injected; injected adapters: {sorted(configs)}")
    bias_mode = configs[adapter_name].bias
    keys: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        # bias key first: where a modules_to_save bias has two keys, loading copies the adapter key last, as peft does
        for key in (_bias_key(model, name, adapter_name, bias_mode), _adapter_key(name, adapter_name)):
            if key is not None:
                keys[PEFT_PREFIX + key] = param
    return keys


def _adapter_key(name: str, adapter_name: str) -> str | None:
    """peft's key for parameter ``name`` if it is the adapter's: a LoRA weight or bias, a DoRA magnitude or a
    modules_to_save copy's."""
    a = re.escape(adapter_name)
    if m := re.fullmatch(rf"(.+)\.(lora_A|lora_B)\.{a}\.(weight|bias)", name):
        return f"{m[1]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(rf"(.+)\.lora_magnitude_vector\.{a}\.weight", name):
        return f"{m[1]}.lora_magnitude_vector"
    if m := re.fullmatch(rf"(.+)\.modules_to_save\.{a}\.(.+)", name):
        return f"{m[1]}.{m[2]}"
    return None


def _bias_key(model: nn.Module, name: str, adapter_name: str, bias_mode: str) -> str | None:
    """peft's key for parameter ``name`` if ``bias_mode`` saves it.

    ``"lora_only"``: the base bias of every layer holding the adapter. ``"all"``: every ``.bias`` except other
    adapters' modules_to_save copies, ``original_module`` ones included, under its name with the adapter name
    dropped where it is second to last (peft's ``_remove_adapter_name_from_state_dict_key``). LoRA biases on B
    are the adapter's own parameters (``_adapter_key``), never a bias mode's.
    """
    if not (name == "bias" or name.endswith(".bias")) or re.search(r"(^|\.)lora_B\.", name):
        return None
    if bias_mode == "lora_only" and name.endswith(".base_layer.bias"):
        return name if adapter_name in model.get_submodule(name.removesuffix(".base_layer.bias")).lora_A else None
    copy_of = re.search(r"(^|\.)modules_to_save\.([^.]+)\.", name)
    if bias_mode != "all" or (copy_of and copy_of[2] != adapter_name):
        return None
    module, _, leaf = name.rpartition(".")
    return f"{module.removesuffix('.' + adapter_name)}.{leaf}"


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors ``save_adapter`` writes, under peft's keys (detached, contiguous copies).

    A base bias is written without the LoRA biases merged into it (``LoraLinear.unmerged_bias``): loading adds them
    again, as the adapters' own ``lora_B.bias``.
    """
    unmerged = {id(layer.base_layer.bias): layer.unmerged_bias() for _, layer in lora_layers(model)}
    keys = peft_key_map(model, adapter_name)
    return {k: unmerged.get(id(p), p).detach().contiguous().clone() for k, p in keys.items()}


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` in peft's format (loads with
    ``peft.PeftModel.from_pretrained`` on the matching transformers model). Both files are written under temp names
    before either replaces its old version in one rename (``nf4lora.files.publish_files``), weights first: a write
    that fails (a full disk) leaves the old adapter whole, never new weights beside an old config."""
    os.makedirs(directory, exist_ok=True)
    tensors = adapter_state_dict(model, adapter_name)  # raises for an unknown adapter
    config = model.lora_configs[adapter_name]
    cpu_tensors = {k: v.cpu() for k, v in tensors.items()}
    # Top-level keys sorted, as peft writes them; the pattern dicts keep their order, because the first key that
    # applies wins (peft sorts them too, so an adapter whose keys overlap comes back with other ranks).
    text = json.dumps(dict(sorted(config.to_peft_dict(base_model_name_or_path).items())), indent=2)
    publish_files(Path(directory), {
        WEIGHTS_NAME: lambda tmp: save_file(cpu_tensors, str(tmp), metadata={"format": "pt"}),
        CONFIG_NAME: lambda tmp: tmp.write_bytes(text.encode("utf-8")),
    })


def read_adapter_config(directory: str | os.PathLike, lora_dtype: torch.dtype = torch.float32) -> LoraConfig:
    """The ``LoraConfig`` stored in ``directory/adapter_config.json`` (peft's or ours)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        subdirs = os.listdir(directory) if os.path.isdir(directory) else []
        named = sorted(d for d in subdirs if os.path.isfile(os.path.join(directory, d, CONFIG_NAME)))
        where = f"with {CONFIG_NAME}"
        if named:
            where = f"(peft saves a non-default adapter in a subfolder: this one has {named})"
        raise ValueError(f"{path} does not exist; expected a peft adapter directory {where}")
    values = read_json_object(path)
    return LoraConfig.from_peft_dict(values, lora_dtype=lora_dtype)


def _unchanged_base_keys(model: nn.Module, extra: dict[str, torch.Tensor], path: str) -> set[str]:
    """The keys of ``extra`` (file tensors outside the adapter) that name a base parameter of ``model`` and hold
    exactly its value once cast to its dtype.

    peft saves the base weights of a targeted embedding layer or output head beside the adapter and loads
    them over the base (cast to the base's dtype: an fp32 copy over a bf16 model); equal ones change nothing.
    One that differs (a resized or retrained embedding) is an error: this package loads adapters, never base weights.
    """
    named = model.named_parameters(remove_duplicate=False)
    base = {PEFT_PREFIX + n: p for n, p in named if not _ADAPTER_PART.search(n)}
    keys = set()
    for key in extra.keys() & base.keys():
        tensor, param = extra[key], base[key]
        if tensor.shape != param.shape or not torch.equal(tensor.to(param.dtype), param.detach().cpu()):
            raise ValueError(
                f"{path}: key {key} holds a base weight that differs from the model's ({tensor.dtype} "
                f"{tuple(tensor.shape)} vs {param.dtype} {tuple(param.shape)}); expected the base the adapter was "
                "trained on (peft's save_embedding_layers)"
            )
        keys.add(key)
    return keys


def _read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``; never a pickled ``adapter_model.bin``, which can run
    code when loaded."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = f" (it holds {PICKLE_NAME}, a pickle, which nf4lora does not load: re-save it with peft's " \
                  "safe_serialization=True)" if os.path.isfile(os.path.join(directory, PICKLE_NAME)) else ""
        raise ValueError(f"{path} does not exist{pickled}; expected peft's {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None


def _check_tensors(model: nn.Module, expected: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor],
                   path: str) -> None:
    """Raise unless ``tensors`` (the file's) hold exactly the ``expected`` keys, each floating and of its
    parameter's shape, besides base weights equal to the model's (``_unchanged_base_keys``)."""
    missing = sorted(expected.keys() - tensors.keys())
    extra = {k: tensors[k] for k in tensors.keys() - expected.keys()}
    unexpected = sorted(extra.keys() - _unchanged_base_keys(model, extra, path))
    if missing or unexpected:
        unprefixed = "" if not tensors or any(k.startswith(PEFT_PREFIX) for k in tensors) else \
            f" (no key starts with peft's prefix {PEFT_PREFIX!r})"
        raise ValueError(f"{path} does not fit the model{unprefixed}: missing keys {_some_keys(missing)}, "
                         f"unexpected keys {_some_keys(unexpected)}")
    for key, param in expected.items():
        tensor = tensors[key]
        if tensor.shape != param.shape:
            raise ValueError(f"{path}: key {key} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{path}: key {key} has dtype {tensor.dtype}, expected a floating dtype such as "
                             f"{param.dtype}")


def _some_keys(keys: list[str], shown: int = 4) -> str:
    """``keys`` in one bounded phrase (a 7B adapter has hundreds): the first ``shown`` and how many more."""
    return f"{keys[:shown]} and {len(keys) - shown} more" if len(keys) > shown else str(keys)


@contextlib.contextmanager
def _merges_held(model: nn.Module) -> Iterator[None]:
    """Inside the block the merged LoRA layers of ``model`` read as unmerged, so that injecting an adapter (whose
    ``set_adapter`` unmerges them) leaves their merged weights alone; their merges are back on exit.

    An unmerge restores a weight only up to rounding, so a load that fails after it would leave the model changed.
    """
    held = {layer: layer.merged_adapters for _, layer in lora_layers(model) if layer.merged}
    for layer in held:
        layer.merged_adapters = []
    try:
        yield
    finally:
        for layer, names in held.items():
            layer.merged_adapters = names


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
    lora_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Inject adapter ``adapter_name`` as configured in ``directory`` and load its weights; returns ``model``.

    The file's keys must equal the ones the injected adapter expects (``peft_key_map``) and every
    tensor must be floating, of its parameter's shape; otherwise a ValueError names the missing and unexpected keys
    (or the shape, or the dtype) and the model is left as it was. A pickled ``adapter_model.bin`` is never loaded.
    The adapter becomes the active one. As in peft, list entries of ``target_modules`` / ``modules_to_save`` that
    select no module are ignored (the key check covers them), and base weights that peft saves beside the adapter
    (``save_embedding_layers``, e.g. of a targeted ``lm_head``) are accepted when they equal the model's.
    """
    config = without_unmatched_entries(model, read_adapter_config(directory, lora_dtype))
    tensors = _read_weights(directory)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    active = active_adapters(model) if hasattr(model, "lora_configs") else None
    with _merges_held(model):
        inject_lora(model, config, adapter_name)
        try:
            expected = peft_key_map(model, adapter_name)
            _check_tensors(model, expected, tensors, os.path.join(directory, WEIGHTS_NAME))
        except ValueError:
            delete_adapter(model, adapter_name)
            if active is not None:
                set_adapter(model, active)
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])
            raise
    set_adapter(model, adapter_name)  # now unmerges the merged layers, as injecting the adapter does
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return model
