"""LoRA and DoRA adapters on frozen ``nn.Linear``/``NF4Linear`` bases, interchangeable with peft.

- ``config``: ``LoraConfig`` (peft's fields).
- ``functional``: the in-place fused LoRA update (``lora_add``), its reference and DoRA's math.
- ``layers``: ``LoraLinear`` (named adapters, merge/unmerge) and ``ModulesToSave``.
- ``model``: ``inject_lora``, ``set_adapter``, ``disable_adapters``, merging, ``print_trainable_parameters``.
- ``adapters``: ``save_adapter``/``load_adapter`` in peft's on-disk format.
"""

from nf4lora.lora.adapters import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from nf4lora.lora.config import LoraConfig
from nf4lora.lora.layers import LoraLinear, ModulesToSave
from nf4lora.lora.model import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    inject_lora,
    lora_layers,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unmerge_adapters,
)

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "ModulesToSave",
    "active_adapters",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "merge_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "unmerge_adapters",
]
