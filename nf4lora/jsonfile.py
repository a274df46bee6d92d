"""Reading the small JSON files of a model or adapter directory (config.json, adapter_config.json, ...)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in file ``path``; malformed JSON, text that is not UTF-8 or another JSON type is a
    one-line ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


class RepeatedKey(ValueError):
    """A JSON object names a key twice: json.loads would keep the last value and silently drop the others."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears twice in one object")
        self.key = key


def object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' ``object_pairs_hook``: the object as a dict, raising RepeatedKey for a key it names twice."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        seen: set[str] = set()
        raise RepeatedKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return fields
