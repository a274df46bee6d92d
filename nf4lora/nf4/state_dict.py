"""bitsandbytes' serialized 4-bit format: the state-dict entries of a `Linear4bit` weight, both directions.

For a weight saved under `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"):
- `{prefix}`: (ceil(n/2), 1) uint8 packed codes;
- `{prefix}.absmax`: float32 (nblocks,), or uint8 (nblocks,) when double-quantized;
- `{prefix}.quant_map`: (16,) float32 codebook;
- `{prefix}.nested_absmax`, `{prefix}.nested_quant_map`: float32, only when double-quantized;
- `{prefix}.quant_state.bitsandbytes__{nf4|fp4}`: uint8 bytes of a JSON object with quant_type, blocksize, dtype,
  shape, and when double-quantized nested_blocksize, nested_dtype and nested_offset, in that key order.
transformers + bitsandbytes checkpoints (the hub's `*-bnb-4bit` repos) store their linear weights this way.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from .blockwise import num_blocks
from .codebook import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, get_code
from .tensor import QuantizedTensor, QuantState, check_decodes_finite

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_KEY = "quant_state.bitsandbytes__"
# the quant_state JSON's fields, in bitsandbytes' order; its QuantState.from_dict refuses any other
_FIELDS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_KEYS = ("nested_absmax", "nested_quant_map")
_BLOCKSIZES_TEXT = ", ".join(map(str, BLOCKSIZES))
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(q: QuantizedTensor, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The bitsandbytes state-dict entries of `q` under `prefix` (module docstring), on `q`'s device."""
    state = q.state
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(
            f"bitsandbytes' format has no place for a {state.quant_type!r} codebook; valid: {', '.join(QUANT_TYPES)}"
        )
    meta = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    # codebooks are copied: quantized weights may share one (the Triton quantizer's), and safetensors refuses
    # a state dict whose tensors share storage
    entries = {
        prefix: q.packed.view(-1, 1), f"{prefix}.absmax": state.absmax, f"{prefix}.quant_map": state.code.clone(),
    }
    if state.double_quant:
        meta.update(
            nested_blocksize=state.nested_blocksize,
            nested_dtype=_dtype_name(state.nested_absmax.dtype),
            nested_offset=state.offset.item(),
        )
        entries[f"{prefix}.nested_absmax"] = state.nested_absmax
        entries[f"{prefix}.nested_quant_map"] = state.nested_code.clone()
    packed_meta = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8, device=q.device)
    entries[f"{prefix}.{_STATE_KEY}{state.quant_type}"] = packed_meta
    return entries


# the suffixes (after `{prefix}`) of every entry a bitsandbytes 4-bit weight can have (module docstring)
_ENTRY_SUFFIXES = ("", ".absmax", ".quant_map", *(f".{k}" for k in _NESTED_KEYS),
                   *(f".{_STATE_KEY}{qt}" for qt in QUANT_TYPES))


def bnb_state_keys(state_dict: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The keys of `state_dict` that belong to the bitsandbytes 4-bit weight saved under `prefix`. Only the entries
    that format has: any other `{prefix}.*` key is left for the caller to report as unexpected."""
    return [prefix + suffix for suffix in _ENTRY_SUFFIXES if prefix + suffix in state_dict]


def is_bnb_4bit(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    """Whether `state_dict` holds a bitsandbytes 4-bit weight under `prefix`."""
    return any(f"{prefix}.{_STATE_KEY}{qt}" in state_dict for qt in QUANT_TYPES)


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"bitsandbytes 4-bit state is missing key {key!r}")
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_finite(t: torch.Tensor, key: str) -> None:
    # a NaN or Inf here would load fine and dequantize whole blocks to NaN or Inf
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{key} has non-finite values ({bad} NaN or Inf); valid: finite numbers")


def _require_float32(state_dict: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """`state_dict[key]`, refused unless it is a finite float32 tensor of `shape`."""
    t = _require(state_dict, key)
    if t.shape != shape or t.dtype != torch.float32:
        raise ValueError(f"{key} must be {shape} float32, got {tuple(t.shape)} {t.dtype}")
    _check_finite(t, key)
    return t


def _read_meta(state_dict: dict, meta_key: str) -> dict:
    """The JSON object stored under `meta_key` as a 1-D uint8 tensor of UTF-8 bytes."""
    raw = state_dict[meta_key]
    corrupt = f"corrupt bitsandbytes quant state in {meta_key!r}"
    if not isinstance(raw, torch.Tensor) or raw.dim() != 1 or raw.dtype != torch.uint8:
        got = f"{tuple(raw.shape)} {raw.dtype}" if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"{corrupt}: expected a 1-D uint8 tensor of JSON bytes, got {got}")
    try:
        meta = json.loads(bytes(raw.cpu().tolist()).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{corrupt}: {exc!r}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{corrupt}: expected a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{meta_key!r} has unknown field(s) {unknown}; valid: {', '.join(_FIELDS)}")
    return meta


def _is_blocksize(value) -> bool:
    return type(value) is int and value in BLOCKSIZES


def _is_shape(value) -> bool:
    return (
        isinstance(value, list) and all(type(d) is int and d >= 0 for d in value) and math.prod(value) < 2**63
    )


def _is_dtype_name(value) -> bool:
    return isinstance(value, str) and value in _DTYPES


def _is_float32_number(value) -> bool:
    # the offset is stored in float32: a larger finite number would load as Inf (an int beyond any float's range
    # made math.isfinite raise OverflowError); NaN fails the comparison
    return type(value) in (int, float) and abs(value) <= _FLOAT32_MAX


def _meta_field(meta: dict, meta_key: str, name: str, is_valid, valid: str, default=None):
    """`meta[name]` (or `default` when absent and not None), refused unless `is_valid`; `valid` describes it."""
    if name not in meta:
        if default is None:
            raise ValueError(f"{meta_key!r} has no {name}; valid: {valid}")
        return default
    value = meta[name]
    if not is_valid(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + f"... ({len(repr(value))} characters)"
        raise ValueError(f"{meta_key!r} has {name} {shown}; valid: {valid}")
    return value


def _nested_fields(state_dict: dict, prefix: str, meta: dict, meta_key: str, n_blocks: int) -> dict:
    """The double-quantization fields of a `QuantState` (offset, nested_absmax, nested_code, nested_blocksize)."""
    nested_blocksize = _meta_field(
        meta, meta_key, "nested_blocksize", _is_blocksize, _BLOCKSIZES_TEXT, default=NESTED_BLOCKSIZE
    )
    # bitsandbytes decodes the 8-bit absmax in nested_dtype; it only ever writes float32, the dtype we decode in
    _meta_field(meta, meta_key, "nested_dtype", lambda v: v == "float32", "'float32'", default="float32")
    offset = _meta_field(meta, meta_key, "nested_offset", _is_float32_number, "a finite number within float32's range")
    nested_absmax = _require_float32(state_dict, f"{prefix}.nested_absmax", (num_blocks(n_blocks, nested_blocksize),))
    return dict(
        offset=torch.tensor(float(offset), dtype=torch.float32, device=nested_absmax.device),
        nested_absmax=nested_absmax,
        nested_code=_require_float32(state_dict, f"{prefix}.nested_quant_map", (256,)),
        nested_blocksize=nested_blocksize,
    )


def _require_codebook(state_dict: dict, prefix: str, quant_type: str) -> torch.Tensor:
    """`{prefix}.quant_map`, refused unless it is `quant_type`'s codebook: bitsandbytes decodes with the table of
    quant_type and ignores quant_map, so any other map would decode differently there and here."""
    key = f"{prefix}.quant_map"
    code = _require_float32(state_dict, key, (16,))
    expected = get_code(quant_type).to(code.device)
    if not torch.equal(code, expected):
        diff = float((code - expected).abs().max())
        raise ValueError(f"{key} is not the {quant_type} codebook (differs by up to {diff:.3g}); valid: exactly "
                         f"bitsandbytes' {quant_type} table, which is what bitsandbytes decodes it with")
    return code


def _check_absmax(absmax: torch.Tensor, key: str, double_quant: bool) -> None:
    """Refuse an absmax of the wrong dtype for its format, or a float32 one with non-finite or negative values."""
    if double_quant:
        if absmax.dtype != torch.uint8:
            raise ValueError(f"{key} must be uint8 with double quantization, got {absmax.dtype}")
        return
    if absmax.dtype != torch.float32:
        raise ValueError(f"{key} must be float32 without double quantization, got {absmax.dtype}")
    _check_finite(absmax, key)
    if bool((absmax < 0).any()):
        raise ValueError(f"{key} has negative values (min {float(absmax.min())}); valid: absmax >= 0")


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """Rebuild a `QuantizedTensor` from the bitsandbytes entries under `prefix`; refuses a corrupt or mismatched
    state (missing or stray keys, wrong dtypes or shapes, bad or unknown quant_state fields, non-finite values, an
    absmax that decodes beyond its dtype, a quant_map that is not its quant_type's codebook) with a ValueError naming
    the key."""
    found = [qt for qt in QUANT_TYPES if f"{prefix}.{_STATE_KEY}{qt}" in state_dict]
    if len(found) != 1:
        # a lone `prefix` entry is a dense weight, not a 4-bit one whose state went missing
        dense = f"; {prefix} is a dense {state_dict[prefix].dtype} weight" if set(state_dict) == {prefix} and isinstance(
            state_dict[prefix], torch.Tensor) and state_dict[prefix].is_floating_point() else ""
        raise ValueError(
            f"expected exactly one key {prefix}.{_STATE_KEY}{{{','.join(QUANT_TYPES)}}}, found {len(found)}{dense}"
        )
    meta_key = f"{prefix}.{_STATE_KEY}{found[0]}"
    meta = _read_meta(state_dict, meta_key)
    _meta_field(meta, meta_key, "quant_type", lambda v: v == found[0], f"{found[0]!r}, as its key says")
    blocksize = _meta_field(meta, meta_key, "blocksize", _is_blocksize, _BLOCKSIZES_TEXT)
    dtype_name = _meta_field(meta, meta_key, "dtype", _is_dtype_name, ", ".join(_DTYPES))
    shape = torch.Size(_meta_field(meta, meta_key, "shape", _is_shape, "a list of non-negative integers"))
    if shape.numel() == 0:  # bitsandbytes writes empty weights (NaN nested_offset included); quantize refuses them
        raise ValueError(f"{meta_key!r} has shape {list(shape)}, which holds no elements; valid: a shape with at "
                         f"least one element")
    packed = _require(state_dict, prefix)
    absmax = _require(state_dict, f"{prefix}.absmax")
    double_quant = "nested_offset" in meta
    stray = [f"{prefix}.{k}" for k in _NESTED_KEYS if f"{prefix}.{k}" in state_dict]
    stray += [f"{field} in {meta_key!r}" for field in ("nested_blocksize", "nested_dtype") if field in meta]
    if stray and not double_quant:
        raise ValueError(f"{prefix} has {', '.join(stray)} but no nested_offset in {meta_key!r}; valid: all of the "
                         f"nested tensors and fields with nested_offset (double quantization), or none of them")
    _check_absmax(absmax, f"{prefix}.absmax", double_quant)
    state = QuantState(
        absmax=absmax,
        shape=shape,
        dtype=_DTYPES[dtype_name],
        blocksize=blocksize,
        quant_type=found[0],
        code=_require_codebook(state_dict, prefix, found[0]),
    )
    if double_quant:
        nested = _nested_fields(state_dict, prefix, meta, meta_key, num_blocks(shape.numel(), blocksize))
        state = dataclasses.replace(state, **nested)
    q = QuantizedTensor(packed.reshape(-1), state)
    check_decodes_finite(q.state, f"{prefix}.absmax", f"a state whose values fit {dtype_name}")
    return q
