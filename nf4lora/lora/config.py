"""``LoraConfig``: the adapter hyper-parameters, mirroring peft's ``LoraConfig`` field for field.

The fields that peft writes to ``adapter_config.json`` keep peft's names and meanings, so a config
round-trips through :meth:`LoraConfig.to_peft_dict` / :meth:`LoraConfig.from_peft_dict`. One
field is ours and is not written: ``lora_dtype``, the storage dtype of the LoRA parameters (fp32
by default, as in peft).

Beyond the common fields it implements, with peft's semantics:

- ``rank_pattern`` / ``alpha_pattern``: per-module ``r`` / ``lora_alpha``. A key applies to a module whose
  name it matches as a regex, either whole or from just after one of its dots to its end (``"q_proj"``,
  ``"layers.0.self_attn.q_proj"``, ``"^model.layers.0.*"``); the first key that applies, in the dict's order,
  wins (peft's ``get_pattern_key``; see ``pattern_key_matches``). ``for_module(name)`` resolves them; the
  scaling follows per module (rsLoRA included).
- ``layers_to_transform`` (an int or a list) / ``layers_pattern``: only modules in those decoder layers
  are adapted; an empty list means every layer. Only with a list of ``target_modules``; an entry that is a
  module's full name is adapted whatever its layer. The layer index is read as peft's
  ``check_target_module_exists`` reads it (see ``layer_index``).
- ``lora_bias``: a trainable bias on ``lora_B``, saved as ``<path>.lora_B.bias``; the output gains
  ``scaling * bias``, and a merge folds that into the base bias (a base without a bias cannot merge it).

peft options that would change the adapter's math and that this package does not implement
(``fan_in_fan_out``, ``layer_replication``, ``target_parameters``, other initialisations and variants), and
any option this package does not know that is set, are rejected on load rather than silently ignored.
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
    "lora_ga_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# peft config keys that never change the adapter's math: metadata, settings read only by a rejected option, or
# runtime_config (where DoRA's norm is computed while it initialises; peft does not write it).
_PEFT_METADATA = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "runtime_config",
)


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
    exclude_modules: suffixes (or a regex) never targeted. rank_pattern / alpha_pattern: key -> r /
    lora_alpha for the modules the key matches (see the module docstring). layers_to_transform: a
    layer index or a list of them (None or []: every layer); layers_pattern: the name (or names, as
    regexes) of the module list holding the layers, e.g. ``"layers"`` (None: the first ``.<name>.<i>.``).
    lora_bias: a trainable bias on B. lora_dtype: storage dtype of A, B (and its bias) and the DoRA
    magnitude.
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
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    lora_bias: bool = False
    lora_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is not a valid rank; expected a positive int")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is not a finite number; expected an int or float")
        if self.target_modules is None:
            raise ValueError("target_modules=None; expected a list of module-name suffixes, a regex or 'all-linear'")
        if isinstance(self.target_modules, str):
            _check_regex("target_modules", self.target_modules)
        else:
            self.target_modules = _name_list("target_modules", self.target_modules)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is out of range; expected a number 0 <= p < 1")
        for flag in ("use_rslora", "use_dora", "lora_bias"):
            # a JSON string such as "false" would otherwise switch the option on
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} is not a bool; expected True or False")
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
        self._check_patterns()
        self._check_layer_selection()
        if self.lora_bias and (self.use_dora or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"lora_bias=True is not supported with use_dora={self.use_dora}, "
                f"init_lora_weights={self.init_lora_weights!r}; expected use_dora=False and init_lora_weights "
                "True or False (as peft)"
            )

    def _check_patterns(self) -> None:
        # null (peft's fields are Optional) means no override, as in peft
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern
        self.alpha_pattern = {} if self.alpha_pattern is None else self.alpha_pattern
        for field, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise ValueError(f"{field}={patterns!r} is not a dict; expected {{module-name key: value}}")
            for key, value in patterns.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{field} key {key!r} is not valid; expected a non-empty module name or regex")
                _check_regex(f"{field} key", key)
                if field == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(f"rank_pattern[{key!r}]={value!r} is not a valid rank; expected a positive int")
                if field == "alpha_pattern" and (not _is_number(value) or not math.isfinite(value)):
                    raise ValueError(f"alpha_pattern[{key!r}]={value!r} is not a finite number; expected an int or "
                                     "float")

    def _check_layer_selection(self) -> None:
        """peft's rules: both need a list of target_modules, and a layers_pattern needs layers_to_transform."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if isinstance(layers, (list, tuple)):
            layers = self.layers_to_transform = list(layers)
        valid = layers is None or _is_index(layers) or (isinstance(layers, list) and all(map(_is_index, layers)))
        if not valid:
            raise ValueError(f"layers_to_transform={layers!r} is not valid; expected None, a layer index >= 0 or a "
                             "list of them")
        if isinstance(pattern, str):
            _check_regex("layers_pattern", pattern)
        elif pattern is not None:
            pattern = self.layers_pattern = _name_list("layers_pattern", pattern)
            for p in pattern:
                _check_regex("layers_pattern", p)
        for field, value in (("layers_to_transform", layers), ("layers_pattern", pattern)):
            if value is not None and isinstance(self.target_modules, str):
                raise ValueError(f"{field}={value!r} needs target_modules as a list of names (as peft), got "
                                 f"target_modules={self.target_modules!r}")
        if pattern and layers is None:
            raise ValueError(f"layers_pattern={pattern!r} without layers_to_transform selects nothing; expected "
                             "layers_to_transform too (as peft)")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r`` (the defaults; a module's
        own follows ``for_module``)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def layer_indices(self) -> list[int] | None:
        """The decoder layers to adapt, or None for every one (peft reads an empty list as every layer)."""
        layers = self.layers_to_transform
        return [layers] if isinstance(layers, int) else (layers or None)

    def for_module(self, module_name: str) -> LoraConfig:
        """This config with ``r`` and ``lora_alpha`` resolved for module ``module_name`` (e.g.
        ``model.layers.0.self_attn.q_proj``) by ``rank_pattern`` / ``alpha_pattern``, and those emptied: what
        ``LoraLinear`` builds that module's adapter from."""
        return dataclasses.replace(
            self, r=_pattern_value(self.rank_pattern, module_name, self.r),
            lora_alpha=_pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
            rank_pattern={}, alpha_pattern={},
        )

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
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "lora_bias": self.lora_bias,
            **_PEFT_INERT_DEFAULTS,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], lora_dtype: torch.dtype = torch.float32) -> LoraConfig:
        """Build from a peft ``adapter_config.json`` dict; options that change the math must be at their defaults."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"peft_type={peft_type!r} is not supported; expected 'LORA'")
        # peft tests these options for truth: unset (None, False, {} or []) is each one's default
        for key, default in _PEFT_INERT_DEFAULTS.items():
            value = d.get(key, default)
            if not _is_unset(value):
                raise ValueError(f"peft option {key}={value!r} is not supported; expected {default!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"lora_dtype"}
        known = fields | set(_PEFT_INERT_DEFAULTS) | set(_PEFT_METADATA)
        # options of a newer peft may change the math: refuse any that is set rather than ignore it
        unknown = {k: v for k, v in d.items() if k not in known and not _is_unset(v)}
        if unknown:
            raise ValueError(f"peft options {unknown} are not known to nf4lora; expected them absent or unset")
        kwargs = {name: d[name] for name in fields if name in d}
        return cls(**kwargs, lora_dtype=lora_dtype)


def _is_unset(value: Any) -> bool:
    """Whether a peft option holds an empty value: None, False (or 0), {} or []."""
    return value in (None, False, {}, [])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def pattern_key_matches(key: str, module_name: str) -> bool:
    """Whether ``rank_pattern`` / ``alpha_pattern`` key ``key`` applies to ``module_name`` (peft's ``get_pattern_key``:
    the key, as a regex, matches the whole name or the part after one of its dots)."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that applies to ``module_name``, else ``default``."""
    return next((value for key, value in patterns.items() if pattern_key_matches(key, module_name)), default)


def layer_index(module_name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The decoder-layer index in ``module_name``, read as peft's ``check_target_module_exists`` reads it: the first
    ``<p>.<digits>.`` for a pattern p of ``layers_pattern`` (tried in order), or, without one, the first
    ``.<name>.<digits>.`` (so ``model.layers.3.mlp.experts.0.up_proj`` is in layer 3). None where there is none."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module_name) for p in patterns)
        match = next((m for m in found if m is not None), None)
    return None if match is None else int(match["idx"])


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regex ({err}); expected a list of names or a regex")


def _name_list(field: str, names: Any) -> list[str]:
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field}={names!r} is not valid; expected a list of non-empty module-name strings")
    return sorted(names) if isinstance(names, set) else list(names)
