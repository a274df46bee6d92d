"""Model-level LoRA: injection, adapter switching, merging and parameter accounting.

``inject_lora(model, config, adapter_name)`` edits ``model`` in place: every module that
``config.target_modules`` selects is replaced by a ``LoraLinear`` wrapping it (or, if it is one
already, gains the new adapter), every ``modules_to_save`` match by a ``ModulesToSave`` wrapper,
and all base parameters are frozen. Module names are not changed otherwise, so a Hugging Face-named
model (``model.layers.0.self_attn.q_proj``) keeps peft's paths plus ``.base_layer`` / ``.lora_A``.
The configs of the injected adapters are kept on ``model.lora_configs`` (name -> ``LoraConfig``).

Target matching follows peft: a list matches a module whose name equals an entry or ends with
``"." + entry``; a string is a regex that must match the whole name; ``"all-linear"`` is every
``nn.Linear``/``NF4Linear`` except the output head. With ``layers_to_transform``, a list's suffix matches
count only in those layers (as ``config.layer_index`` reads them), full-name matches everywhere, as in peft.
``modules_to_save`` entries match as peft's do, by plain name suffix (``"norm"`` selects ``model.norm``
and every ``*_layernorm``), and the layers at or inside a module to save are never targeted (its full
copy trains them). Each adapted module gets the r and alpha that ``rank_pattern`` / ``alpha_pattern``
give it (``LoraConfig.for_module``). Unlike peft, a config that selects nothing, or a list entry, layer
index or pattern key that selects nothing, is an error listing what exists (peft ignores or warns);
``without_unmatched_entries`` drops such entries where the caller checks the outcome otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator

from torch import nn

from nf4lora.lora.config import ALL_LINEAR, LoraConfig, layer_index, pattern_key_matches
from nf4lora.lora.layers import LoraLinear, ModulesToSave, adapter_name_list, check_adapter_name, is_linear
from nf4lora.nf4 import quantize
from nf4lora.nf4.linear import NF4Linear, frozen_linear

OUTPUT_HEAD_NAMES = ("lm_head",)


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {n for n in OUTPUT_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    heads |= {n for n, m in model.named_modules() if head is not None and m is head}
    return heads


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the base linear layers (``nn.Linear``/``NF4Linear``, or ones already wrapped by LoRA)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            names.append(name)
        elif is_linear(module) and not _inside_adapter(name):
            names.append(name)
    return names


def _inside_adapter(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "modules_to_save", "original_module") for p in parts)


def _module_names(model: nn.Module) -> list[str]:
    """Names of the model's own modules (the root and the adapters' internals left out)."""
    return [n for n, _ in model.named_modules() if n and not _inside_adapter(n)]


def _target_names(model: nn.Module, config: LoraConfig, to_save: list[str]) -> list[str]:
    """Names of the linear modules ``config`` targets, leaving out those at or inside ``to_save`` modules."""
    linear = linear_module_names(model)
    if config.target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        candidates = [n for n in linear if n not in heads]
    else:
        candidates = [n for n in _module_names(model) if _name_matches(n, config.target_modules)]
        not_linear = [n for n in candidates if n not in linear]
        if not_linear:
            raise ValueError(
                f"target_modules={config.target_modules!r} selects non-linear modules {not_linear[:8]}; "
                f"LoRA wraps only linear layers: {_describe(linear)}"
            )
        # a misspelt entry next to a good one would otherwise leave its layers without adapters, silently
        unmatched = [] if isinstance(config.target_modules, str) or not candidates else [
            p for p in config.target_modules if not any(_name_matches(n, [p]) for n in candidates)
        ]
        if unmatched:
            raise ValueError(f"target_modules entries {unmatched} match no module; linear modules: {_describe(linear)}")
        unmatched_layers = _unmatched_layers(config, candidates) if candidates else []
        if unmatched_layers:
            found = sorted({i for n in candidates if (i := layer_index(n, config.layers_pattern)) is not None})
            raise ValueError(
                f"layers_to_transform={config.layers_to_transform!r} holds layers {unmatched_layers} where "
                f"target_modules matches no module; target_modules matches in layers {found} "
                f"(read with layers_pattern={config.layers_pattern!r})"
            )
        candidates = [n for n in candidates if _in_transformed_layer(n, config)]
    if config.exclude_modules:
        kept = [n for n in candidates if not _name_matches(n, config.exclude_modules)]
        if candidates and not kept:
            raise ValueError(f"exclude_modules={config.exclude_modules!r} excludes every module that "
                             f"target_modules={config.target_modules!r} selects: {_describe(candidates)}")
        candidates = kept
    candidates = [n for n in candidates if not any(n == s or n.startswith(s + ".") for s in to_save)]
    if not candidates:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear module; linear modules: "
                         f"{_describe(linear)}")
    return candidates


def _describe(names: list[str]) -> str:
    """Module names in one bounded phrase: their distinct last parts, how many, and the first in full (a 7B model's
    224 linear paths listed whole made a 10 KB error line)."""
    leaves = sorted({name.rpartition(".")[2] for name in names})
    return f"names ending in {leaves} ({len(names)} modules, such as {names[0]!r})" if names else "none"


def _in_transformed_layer(name: str, config: LoraConfig) -> bool:
    """Whether layer selection keeps module ``name``, which a list of target_modules matches: peft keeps one named
    in full by an entry, or one in a layer of ``layers_to_transform`` (every one when that is None or [])."""
    layers = config.layer_indices
    return layers is None or name in config.target_modules or layer_index(name, config.layers_pattern) in layers


def _unmatched_layers(config: LoraConfig, matched: list[str]) -> list[int]:
    """The ``layers_to_transform`` indices in which no module of ``matched`` lies (peft adapts nothing there)."""
    found = {layer_index(n, config.layers_pattern) for n in matched}
    return [i for i in config.layer_indices or () if i not in found]


def _unmatched_pattern_keys(config: LoraConfig, targets: list[str]) -> dict[str, list[str]]:
    """``rank_pattern`` / ``alpha_pattern`` keys (by field) that apply to none of ``targets`` (peft warns)."""
    unmatched = {}
    for field in ("rank_pattern", "alpha_pattern"):
        keys = [k for k in getattr(config, field) if not any(pattern_key_matches(k, n) for n in targets)]
        if keys:
            unmatched[field] = keys
    return unmatched


def _saved_by(name: str, entry: str) -> bool:
    """Whether modules_to_save ``entry`` selects module ``name``: a plain suffix match, as peft's ``_set_trainable``."""
    return name.endswith(entry)


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config.modules_to_save`` selects; an entry that selects none, or a selected module
    inside another, is an error."""
    patterns = config.modules_to_save or []
    names = [n for n in _module_names(model) if any(_saved_by(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(_saved_by(n, p) for n in names)]
    if unmatched:
        leaves = sorted({leaf for n in _module_names(model) if not (leaf := n.rpartition(".")[2]).isdigit()})
        raise ValueError(f"modules_to_save entries {unmatched} match no module; module names end in: {leaves}")
    for outer in names:
        inner = next((n for n in names if n.startswith(outer + ".")), None)
        if inner is not None:
            raise ValueError(f"modules_to_save={patterns} selects {inner} inside {outer}; "
                             "expected modules that do not contain one another")
    return names


def without_unmatched_entries(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` without the ``target_modules`` / ``modules_to_save`` list entries that select no module of
    ``model``, which peft ignores (a sequence-classification adapter lists both of peft's head names, "classifier"
    and "score"). A list none of whose entries matches is kept, for ``inject_lora`` to report.

    Likewise the ``layers_to_transform`` indices (of a list) where the targets have no module, and the
    ``rank_pattern`` / ``alpha_pattern`` keys that apply to no targeted module, which peft ignores too.

    ``inject_lora`` refuses such entries, because a misspelt one would leave modules untrained; ``load_adapter``
    drops them, because there the file's keys are checked against the injected adapter exactly. Errors that
    ``inject_lora`` would raise for the config that is left, it raises here.
    """
    names = _module_names(model)
    changes = {}
    if isinstance(config.target_modules, list):
        kept = [p for p in config.target_modules if any(_name_matches(n, [p]) for n in names)]
        changes["target_modules"] = kept or config.target_modules
        if isinstance(config.layers_to_transform, list):
            unmatched = _unmatched_layers(config, [n for n in names if _name_matches(n, changes["target_modules"])])
            kept_layers = [i for i in config.layers_to_transform if i not in unmatched]
            changes["layers_to_transform"] = kept_layers or config.layers_to_transform
    if config.modules_to_save:
        kept = [p for p in config.modules_to_save if any(_saved_by(n, p) for n in names)]
        changes["modules_to_save"] = kept or config.modules_to_save
    config = dataclasses.replace(config, **changes)
    if config.rank_pattern or config.alpha_pattern:
        targets = _target_names(model, config, _modules_to_save_names(model, config))
        config = dataclasses.replace(config, **{
            field: {k: v for k, v in getattr(config, field).items() if k not in keys}
            for field, keys in _unmatched_pattern_keys(config, targets).items()
        })
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place (see the module docstring); returns ``model``.

    Freezes every base parameter, then leaves trainable: the LoRA parameters of this adapter, its
    ``modules_to_save`` copies, and the biases that ``config.bias`` selects (``"all"``: every bias in
    the model; ``"lora_only"``: the biases of the layers this adapter wraps). As in peft, at most one adapter of
    a model may have a bias mode.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config is a {type(config).__name__}, not a LoraConfig; expected LoraConfig(...) (from a "
                        "dict: LoraConfig(**d), from peft's JSON: LoraConfig.from_peft_dict(d))")
    configs: dict[str, LoraConfig] = getattr(model, "lora_configs", {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} is already injected; existing adapters: {sorted(configs)}")
    check_adapter_name(adapter_name)
    _check_one_bias_mode(configs, config)
    to_save = _modules_to_save_names(model, config)
    targets = _target_names(model, config, to_save)
    unmatched_keys = _unmatched_pattern_keys(config, targets)
    if unmatched_keys:
        raise ValueError(f"pattern keys {unmatched_keys} apply to no targeted module; targeted modules: {targets}")
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            module.add_adapter(adapter_name, config.for_module(name))
        else:
            _set_submodule(model, name, LoraLinear(module, adapter_name, config.for_module(name)))
    for name in to_save:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        else:
            _set_submodule(model, name, ModulesToSave(module, adapter_name))
    model.lora_configs = {**configs, adapter_name: config}
    _freeze_base(model)
    set_adapter(model, adapter_name)
    return model


def _check_one_bias_mode(configs: dict[str, LoraConfig], config: LoraConfig) -> None:
    """Refuse a second adapter with a bias mode, as peft does: both would train and load the same base biases, so
    loading or training one would silently change the other's outputs."""
    biased = sorted(n for n, c in configs.items() if c.bias != "none")
    if config.bias != "none" and biased:
        raise ValueError(f"bias={config.bias!r} for a second adapter with a bias mode (adapter {biased[0]!r} has "
                         f"bias={configs[biased[0]].bias!r}); expected bias='none' here, since adapters with bias "
                         "modes share the base biases (peft allows only one)")


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``; layers left without adapters revert to their base module."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} is not injected; injected adapters: {sorted(configs)}")
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            if adapter_name in module.merged_adapters:
                module.unmerge()
            for d in (module.lora_A, module.lora_B, module.lora_dropout, module.lora_magnitude_vector):
                if adapter_name in d:
                    del d[adapter_name]
            del module.r[adapter_name], module.scaling[adapter_name]
            module.active_adapters = [n for n in module.active_adapters if n != adapter_name]
            if not module.lora_A:
                _set_submodule(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save.pop(adapter_name)
            module.active_adapters = [n for n in module.active_adapters if n != adapter_name]
            if not len(module.modules_to_save):
                _set_submodule(model, name, module.original_module)
    model.lora_configs = {k: v for k, v in configs.items() if k != adapter_name}
    _freeze_base(model)
    if model.lora_configs:
        remaining = [n for n in active_adapters(model) if n in model.lora_configs]
        set_adapter(model, remaining or next(iter(model.lora_configs)))
    else:
        del model.lora_configs


def _freeze_base(model: nn.Module) -> None:
    """requires_grad off everywhere; ``set_adapter`` then turns it on for what the active adapters train."""
    for p in model.parameters():
        p.requires_grad_(False)


def _train_biases(model: nn.Module, adapter_names: list[str]) -> None:
    """requires_grad on the base biases that the bias modes of ``adapter_names`` train, off on the others.

    ``"all"``: every bias outside the modules_to_save wrappers (their copies follow their adapter) and outside
    ``lora_B`` (a LoRA bias is its adapter's parameter, switched by ``set_adapter``); ``"lora_only"``: the base bias
    of each LoRA layer holding one of these adapters -- exactly the biases ``save_adapter`` writes for it, so that
    none is trained and then left unsaved.
    """
    configs = model.lora_configs
    every = any(configs[n].bias == "all" for n in adapter_names)
    lora_only = {n for n in adapter_names if configs[n].bias == "lora_only"}
    for name, param in model.named_parameters():
        adapter_owned = re.search(r"(^|\.)(original_module|modules_to_save|lora_B)\.", name)
        if (name == "bias" or name.endswith(".bias")) and not adapter_owned:
            param.requires_grad_(every)
    for _, layer in lora_layers(model):
        if layer.base_layer.bias is not None and not lora_only.isdisjoint(layer.lora_A):
            layer.base_layer.bias.requires_grad_(True)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every ``LoraLinear`` in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def _adapter_modules(model: nn.Module) -> Iterator[LoraLinear | ModulesToSave]:
    return (m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave)))


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapter(s) on every layer; only their parameters (and the biases their
    ``bias`` modes select) stay trainable."""
    known = getattr(model, "lora_configs", {})
    if not isinstance(adapter_names, (str, list, tuple)):
        raise TypeError(f"adapter_names={adapter_names!r} is not a name or a list of names; expected some of "
                        f"{sorted(known)}")
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in known]
    if not names:
        raise ValueError(f"adapter_names={adapter_names!r} is empty; expected some of {sorted(known)} "
                         "(disable_adapters(model) runs the base model)")
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; injected adapters: {sorted(known)}")
    for module in _adapter_modules(model):
        if isinstance(module, LoraLinear) and module.merged:
            module.unmerge()
        module.active_adapters = list(names)
        dicts = (
            (module.lora_A, module.lora_B, module.lora_magnitude_vector)
            if isinstance(module, LoraLinear)
            else (module.modules_to_save,)
        )
        for d in dicts:
            for name, sub in d.items():
                sub.requires_grad_(name in names)
    _train_biases(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names (as set by ``inject_lora``/``set_adapter``)."""
    for module in _adapter_modules(model):
        return list(module.active_adapters)
    raise ValueError("model has no LoRA layers; call inject_lora(model, config) first")


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block (merged layers are unmerged first)."""
    modules = list(_adapter_modules(model))
    for module in modules:
        module.disable_adapters = True
    try:
        yield
    finally:
        for module in modules:
            module.disable_adapters = False


def _check_adapter_names(model: nn.Module, adapter_names: list[str] | None) -> None:
    known = getattr(model, "lora_configs", {})
    unknown = [n for n in adapter_name_list(adapter_names) or () if n not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; injected adapters: {sorted(known)}")


def _held(layer: LoraLinear, adapter_names: list[str] | None) -> list[str] | None:
    """The requested adapters that ``layer`` holds (None: the layer's active ones)."""
    return None if adapter_names is None else [n for n in adapter_names if n in layer.lora_A]


def _check_mergeable(model: nn.Module, adapter_names: list[str] | None) -> None:
    """Refuse a merge of ``adapter_names`` before any layer changes (see ``LoraLinear.check_mergeable``)."""
    _check_adapter_names(model, adapter_names)
    for name, layer in lora_layers(model):
        try:
            layer.check_mergeable(_held(layer, adapter_names))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """Fold ``adapter_names`` (default: the active ones) into every dense (bf16/fp32) base in place;
    ``unmerge_adapters`` reverts. NF4 bases refuse (see ``merge_and_unload``)."""
    _check_mergeable(model, adapter_names)
    for _, layer in lora_layers(model):
        layer.merge(_held(layer, adapter_names))


def unmerge_adapters(model: nn.Module) -> None:
    """Undo ``merge_adapters`` on every layer."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(
    model: nn.Module, adapter_names: list[str] | None = None, requantize: bool = False
) -> nn.Module:
    """Replace every ``LoraLinear`` by its base with the adapters folded in, in place; returns ``model``.

    Dense bases keep their dtype. An NF4 base becomes an ``nn.Linear`` in its compute dtype holding
    the dequantized weight plus the update, or, with ``requantize=True``, an ``NF4Linear`` of that
    merged weight and bias (formed in the dtypes peft forms them in: ``LoraLinear.merged_dtypes``) with the base's
    quantization settings;
    this warns, because re-quantizing rounds the small update against NF4's coarse grid and the merged model no
    longer equals the adapted one.
    ``ModulesToSave`` wrappers are replaced by the active adapter's copy.
    """
    _check_mergeable(model, adapter_names)
    layers = list(lora_layers(model))
    if requantize and any(layer.is_nf4 for _, layer in layers):
        warnings.warn(
            "merge_and_unload(requantize=True) re-quantizes W + scaling*B@A to NF4; the LoRA update is "
            "small next to NF4's step size, so much of it rounds away and outputs differ from the "
            "unmerged model. Keep requantize=False (dense merged weights) for exact outputs.",
            stacklevel=2,
        )
    for name, layer in layers:
        base = layer.base_layer
        if not layer.is_nf4:
            layer.merge(_held(layer, adapter_names))
            _set_submodule(model, name, base)
            continue
        held = _held(layer, adapter_names)
        if requantize:
            merged = _requantized_merge(layer, held)
        else:
            merged = frozen_linear(layer.merged_weight(held, base.compute_dtype),
                                   layer.merged_bias(held, base.compute_dtype))
        _set_submodule(model, name, merged)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            active = [n for n in module.active_adapters if n in module.modules_to_save]
            _set_submodule(model, name, module.modules_to_save[active[0]] if active else module.original_module)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def _requantized_merge(layer: LoraLinear, adapter_names: list[str] | None) -> NF4Linear:
    """An ``NF4Linear`` of ``layer``'s NF4 base with ``adapter_names`` (None: the active ones) folded in, quantized
    with the base's settings, as peft's merge leaves a ``Linear4bit``: weight and bias formed in the dtypes peft's
    sums give (``LoraLinear.merged_dtypes``), the weight by peft's arithmetic in them (``held_dtypes``). Rounding the
    merged weight to a narrower dtype first would move every block's absmax and so the NF4 code of nearly every
    element. One adapter's merge, what ``nf4lora merge`` does, gives peft's 4-bit bytes exactly.

    Several adapters are folded in turn and quantized once, on purpose. peft re-quantizes after each one (and, for a
    DoRA adapter after the first, again in the unmerge and re-merge it runs to find the unmerged base), so its codes
    differ: every rounding to NF4 adds its error (about 1.35x the weight error of one rounding, for two adapters of
    scaling 2) and the result depends on the order. Rounding once, as a dense merge does, is the closer to the
    adapted model.
    """
    base, state = layer.base_layer, layer.base_layer.weight.state
    weight_dtype, bias_dtype = layer.merged_dtypes(adapter_names)
    merged = layer.merged_weight(adapter_names, weight_dtype, base_dtype=base.weight.dtype, held_dtypes=True)
    weight = quantize(merged, blocksize=state.blocksize, quant_type=state.quant_type, double_quant=state.double_quant)
    # A LoRA bias adds scaling * b, as the adapter's forward (and peft's dense merge) adds it: the bias the adapted
    # model computed. peft's 4-bit merge adds b unscaled, so the two differ unless scaling is 1.
    bias = None if bias_dtype is None else layer.merged_bias(adapter_names, bias_dtype)
    return NF4Linear(weight, bias, base.compute_dtype)


def _param_count(model: nn.Module) -> tuple[int, int, int, int]:
    """(trainable params, all params, base bytes, adapter bytes); an NF4 weight counts its logical numel.

    Trainable params follow requires_grad, as peft counts them. Bytes follow the module kind instead: LoRA A/B,
    DoRA magnitudes and ``modules_to_save`` copies are adapter bytes whether or not they are active or trained,
    everything else (trained biases included) is base.
    """
    adapter_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLinear):
            parts = (module.lora_A, module.lora_B, module.lora_magnitude_vector)
        elif isinstance(module, ModulesToSave):
            parts = (module.modules_to_save,)
        else:
            continue
        adapter_ids.update(id(p) for part in parts for p in part.parameters())
    trainable = total = base_bytes = adapter_bytes = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if id(p) in adapter_ids:
            adapter_bytes += p.numel() * p.element_size()
        else:
            base_bytes += p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            total += module.weight.numel()
            base_bytes += module.weight.nbytes
    return trainable, total, base_bytes, adapter_bytes


def _fmt_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.1f} {units[i]}"


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print peft's line (``trainable params: X || all params: Y || trainable%: Z``) and a bytes line.

    Returns (trainable, all), counted by requires_grad as peft counts them. "Adapter" bytes are every
    adapter's LoRA A/B, DoRA magnitudes and ``modules_to_save`` copies, active or not, trained or not;
    "base" bytes are the rest, with an NF4 weight counted at its real size (packed nibbles + absmax
    state), not at its logical parameter count.
    """
    trainable, total, base_bytes, adapter_bytes = _param_count(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    print(f"base bytes: {_fmt_bytes(base_bytes)} || adapter bytes: {_fmt_bytes(adapter_bytes)}")
    return trainable, total
