"""``LoraConfig``: the adapter hyper-parameters, mirroring peft's ``LoraConfig`` field for field.

The fields that peft writes to ``adapter_config.json`` keep peft's names and meanings, so a config
round-trips through :meth:`LoraConfig.to_peft_dict` / :meth:`LoraConfig.from_peft_dict`. One
field is ours and is not written: ``lora_dtype``, the storage dtype of the LoRA parameters (fp32
by default, as in peft).

peft options that would change the adapter's math and that this package does not implement
(per-module rank/alpha patterns, ``fan_in_fan_out``, a LoRA bias on B, layer selection) are
rejected on load rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")
ALL_LINEAR = "all-linear"

# peft config keys that are accepted when they hold their default (no effect); anything else is an error.
_PEFT_INERT_DEFAULTS: dict[str, Any] = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "trainable_token_indices": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
}


@dataclasses.dataclass
class LoraConfig:
    """LoRA hyper-parameters (peft's names).

    r: rank (> 0). lora_alpha: numerator of the scaling. target_modules: a list of module-name
    suffixes (``["q_proj", "v_proj"]``), a regex that must match a full module name, or
    ``"all-linear"`` (every linear layer except the output head). lora_dropout: dropout on the
    LoRA input, in [0, 1). bias: which biases train and are saved, one of ``BIAS_MODES``.
    use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``. use_dora: DoRA magnitude
    vector. init_lora_weights: ``True`` (A Kaiming-uniform a=sqrt(5), B zeros), ``"gaussian"``
    (A ~ N(0, 1/r), B zeros) or ``False`` (A and B both random, so a fresh adapter changes the
    output; for tests). modules_to_save: suffixes of modules trained in full and saved.
    exclude_modules: suffixes (or a regex) never targeted. lora_dtype: storage dtype of A, B and
    the DoRA magnitude.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    lora_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is not a valid rank; expected a positive int")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is not a number; expected an int or float")
        if self.target_modules is None:
            raise ValueError("target_modules=None; expected a list of module-name suffixes, a regex or 'all-linear'")
        if isinstance(self.target_modules, str):
            _check_regex("target_modules", self.target_modules)
        else:
            self.target_modules = _name_list("target_modules", self.target_modules)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is out of range; expected 0 <= p < 1")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not a bias mode; expected one of {BIAS_MODES}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; expected one of {INIT_MODES}"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list("modules_to_save", self.modules_to_save)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        elif self.exclude_modules is not None:
            self.exclude_modules = _name_list("exclude_modules", self.exclude_modules)
        if not isinstance(self.lora_dtype, torch.dtype) or not self.lora_dtype.is_floating_point:
            raise ValueError(f"lora_dtype={self.lora_dtype!r} is not a floating dtype; expected e.g. torch.float32")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content that ``peft.PeftModel.from_pretrained`` reads."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "lora_dropout": self.lora_dropout,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": self.init_lora_weights,
            "modules_to_save": self.modules_to_save,
            **_PEFT_INERT_DEFAULTS,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], lora_dtype: torch.dtype = torch.float32) -> LoraConfig:
        """Build from a peft ``adapter_config.json`` dict; options that change the math must be at their defaults."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"peft_type={peft_type!r} is not supported; expected 'LORA'")
        for key, default in _PEFT_INERT_DEFAULTS.items():
            value = d.get(key, default)
            if value != default and not (value is None and default in ({}, None)):
                raise ValueError(f"peft option {key}={value!r} is not supported; expected {default!r}")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "lora_dtype"}
        return cls(**kwargs, lora_dtype=lora_dtype)


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regex ({err}); expected a list of names or a regex")


def _name_list(field: str, names: Any) -> list[str]:
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field}={names!r} is not valid; expected a list of non-empty module-name strings")
    return sorted(names) if isinstance(names, set) else list(names)
