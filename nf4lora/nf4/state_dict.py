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

import json

import torch

from .codebook import QUANT_TYPES
from .tensor import QuantizedTensor, QuantState

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STATE_KEY = "quant_state.bitsandbytes__"


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


def bnb_state_keys(state_dict: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The keys of `state_dict` that belong to the bitsandbytes 4-bit weight saved under `prefix`."""
    return [k for k in state_dict if k == prefix or k.startswith(prefix + ".")]


def is_bnb_4bit(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    """Whether `state_dict` holds a bitsandbytes 4-bit weight under `prefix`."""
    return any(f"{prefix}.{_STATE_KEY}{qt}" in state_dict for qt in QUANT_TYPES)


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"bitsandbytes 4-bit state is missing key {key!r}")
    return state_dict[key]


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """Rebuild a `QuantizedTensor` from the bitsandbytes entries under `prefix`; refuses a corrupt or mismatched state."""
    found = [qt for qt in QUANT_TYPES if f"{prefix}.{_STATE_KEY}{qt}" in state_dict]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one key {prefix}.{_STATE_KEY}{{{','.join(QUANT_TYPES)}}}, found {len(found)}"
        )
    meta_key = f"{prefix}.{_STATE_KEY}{found[0]}"
    try:
        meta = json.loads(bytes(state_dict[meta_key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        dtype, shape = _DTYPES[meta["dtype"]], torch.Size(meta["shape"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt bitsandbytes quant state in {meta_key!r}: {exc!r}") from None
    if quant_type != found[0]:
        raise ValueError(f"{meta_key!r} says quant_type {quant_type!r}, its key says {found[0]!r}")
    packed = _require(state_dict, prefix)
    absmax = _require(state_dict, f"{prefix}.absmax")
    code = _require(state_dict, f"{prefix}.quant_map")
    if code.shape != (16,) or code.dtype != torch.float32:
        raise ValueError(f"{prefix}.quant_map must be (16,) float32, got {tuple(code.shape)} {code.dtype}")
    state = QuantState(
        absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type, code=code
    )
    if "nested_offset" in meta:
        nested_absmax = _require(state_dict, f"{prefix}.nested_absmax")
        nested_code = _require(state_dict, f"{prefix}.nested_quant_map")
        if absmax.dtype != torch.uint8 or nested_code.shape != (256,):
            raise ValueError(
                f"double-quantized state under {prefix!r} needs uint8 absmax and a (256,) nested_quant_map, got "
                f"{absmax.dtype} and {tuple(nested_code.shape)}"
            )
        nested_blocksize = int(meta.get("nested_blocksize", 256))
        if nested_absmax.shape != (-(-absmax.numel() // nested_blocksize),):
            raise ValueError(
                f"{prefix}.nested_absmax has shape {tuple(nested_absmax.shape)}, expected "
                f"({-(-absmax.numel() // nested_blocksize)},) for {absmax.numel()} blocks"
            )
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
        state.nested_absmax = nested_absmax.float()
        state.nested_code = nested_code
        state.nested_blocksize = nested_blocksize
    elif absmax.dtype != torch.float32:
        raise ValueError(f"{prefix}.absmax must be float32 without double quantization, got {absmax.dtype}")
    return QuantizedTensor(packed.reshape(-1), state)
