"""Hugging Face checkpoint files: find them, validate them before reading, and write them.

A model directory holds `config.json` and either `model.safetensors` or `model.safetensors.index.json` plus the
shards it names. Only safetensors are read: pickled `.bin` weights can run arbitrary code when loaded, so a
directory that has nothing else is refused. Each safetensors header is parsed and checked against the file size
here, so a corrupt or truncated file fails with its name and what is wrong instead of deep inside a reader.

safetensors layout: 8 bytes little-endian u64 N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {...}}, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nf4lora.files import publish_files
from nf4lora.jsonfile import RepeatedKey, object_without_repeats, read_json_object

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# A header larger than this is not a real checkpoint (transformers' largest shards have headers of a few MB).
_MAX_HEADER_BYTES = 100 * 2**20
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model")
TOKENIZER_FILES = ("*.json", "tokenizer.model")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name (e.g. "BF16"), shape and byte size."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def resolve_model_dir(path_or_id: str | os.PathLike, patterns: tuple[str, ...] = MODEL_FILES,
                      revision: str | None = None) -> str:
    """A local directory for `path_or_id`: the directory itself, or a hub snapshot of the files matching
    `patterns` at `revision` (a branch, tag or commit hash; None is main), cache first, honouring HF_HUB_OFFLINE.
    A revision with a local directory is refused: a directory has one version. Errors name the path or id and what
    to do."""
    if revision is not None and not (isinstance(revision, str) and revision):
        raise ValueError(f"revision={revision!r} is not a revision; valid: a branch, tag or commit hash of the hub "
                         f"repo, or None (main)")
    path = os.fspath(path_or_id)
    if path.startswith("~") and not os.path.exists(path):
        path = os.path.expanduser(path)  # as a shell would; no hub id starts with "~"
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} picks a version of a hub id, but {path} is a local directory; "
                             f"valid: revision=None for a local directory")
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the model directory that holds config.json")
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        raise FileNotFoundError(f"model directory {path} does not exist; pass a Hugging Face model directory "
                                f"(config.json + *.safetensors) or a hub id such as org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    at_revision = "" if revision is None else f" at revision {revision!r}"
    try:
        return snapshot_download(path, revision=revision, allow_patterns=list(patterns))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and as a hub id{at_revision} it is not in the local Hugging Face "
            f"cache and the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE is set or there is no network); download it first or pass a local directory"
        ) from None
    except HFValidationError as e:
        raise ValueError(f"{path!r} is neither a local directory nor a valid hub id ('org/name'): {e}") from None
    except HfHubHTTPError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # the hub's messages run over several lines
        raise FileNotFoundError(f"hub id {path!r}{at_revision} could not be fetched: {reason}") from None


def read_safetensors_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate the header of one safetensors file; returns {name: TensorEntry}.

    The checks are those safetensors makes when it opens the file (shapes of non-negative integers, each tensor's
    span holds exactly its shape x dtype, the spans sorted by offset tile the data from byte 0 without overlap or
    gap, and the file ends where the data does), so a bad file is refused here with its name instead of by the
    reader later.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header size)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path}: corrupt safetensors header: it claims {n} header bytes in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=object_without_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    except RepeatedKey as e:
        raise ValueError(f"{path}: corrupt safetensors header: {e.key!r} is listed twice; valid: each tensor "
                         f"once") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    entries, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], tuple(info["shape"])
            begin, end = map(int, info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: corrupt safetensors header entry {name!r}: {e!r}") from None
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{path}: corrupt safetensors header: {name!r} has shape {info['shape']!r}; valid: "
                             f"a list of non-negative integers")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; valid: {list(DTYPE_BYTES)}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: corrupt safetensors header: {name!r} spans bytes [{begin}, {end}) but "
                             f"shape {list(shape)} {dtype} needs {nbytes}")
        entries[name] = TensorEntry(path, dtype, shape, nbytes)
        spans.append((begin, end, name))
    data_end = 0
    for begin, end, name in sorted(spans):
        if begin != data_end:
            problem = "overlaps the tensor before it" if begin < data_end else f"{begin - data_end}-byte gap"
            raise ValueError(f"{path}: corrupt safetensors header: {name!r} starts at byte {begin}, expected "
                             f"{data_end} ({problem}); valid: tensors stored back to back from byte 0")
        data_end = end
    if 8 + n + data_end > size:
        raise ValueError(f"{path}: truncated safetensors file: the header needs {8 + n + data_end} bytes, "
                         f"the file has {size}")
    if 8 + n + data_end < size:
        raise ValueError(f"{path}: corrupt safetensors file: {size - 8 - n - data_end} trailing bytes after the "
                         f"tensor data (the header accounts for {8 + n + data_end} bytes, the file has {size})")
    return entries


def checkpoint_index(model_dir: str) -> dict[str, TensorEntry]:
    """{tensor name: TensorEntry} over all safetensors of a model directory, every header validated.

    model.safetensors wins over an index beside it, as in transformers: its save_pretrained leaves a sharded save's
    index behind when it later writes one file (and removes the shards)."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    single = os.path.join(model_dir, SINGLE_NAME)
    if os.path.isfile(single):
        return read_safetensors_header(single)
    if os.path.isfile(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(f"{index_path}: malformed shard index: weight_map is {type(weight_map).__name__}; "
                             f"expected {{'weight_map': {{tensor name: shard file}}}}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise FileNotFoundError(f"{index_path} names shard(s) {missing} that are missing from {model_dir}")
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            for name, entry in read_safetensors_header(os.path.join(model_dir, shard)).items():
                if name in entries:
                    raise ValueError(f"{index_path}: tensor {name!r} is stored in both {entries[name].file} and "
                                     f"{entry.file}; valid: each tensor in one shard")
                entries[name] = entry
        absent = [k for k, s in weight_map.items() if k not in entries or entries[k].file != os.path.join(model_dir, s)]
        if absent:
            raise ValueError(f"{index_path} maps {absent[:3]} to shards that do not contain them")
        return entries
    pickled = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.bin")))
    if pickled:
        raise ValueError(
            f"{model_dir} has only pickled weights {pickled[:3]}; nf4lora reads safetensors only, because unpickling "
            f"can run arbitrary code. Convert once with transformers (save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"{model_dir} has neither {SINGLE_NAME} nor {INDEX_NAME} (only safetensors weights "
                            f"are read)")


def write_checkpoint(out_dir: str, tensors: dict[str, torch.Tensor], config: dict,
                     max_shard_bytes: int | None = None) -> None:
    """Write `tensors` as model.safetensors (or shards + index when larger than `max_shard_bytes`) and config.json.

    Shards are copied to host memory one at a time, so a GPU model needs at most one shard of host memory. Every file
    is written under a temp name before any replaces its old version in one rename (`nf4lora.files.publish_files`),
    config.json last: a write that fails (a full disk) leaves the old checkpoint whole, and no file is half-written.
    """
    from safetensors.torch import save_file

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; valid: a directory (new or existing) to write the checkpoint into")
    os.makedirs(out_dir, exist_ok=True)
    groups: list[list[str]] = [[]]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    names = [SINGLE_NAME] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    writers = {fname: _shard_writer(tensors, group, save_file) for fname, group in zip(names, groups)}
    if len(groups) > 1:
        weight_map = {name: fname for fname, group in zip(names, groups) for name in group}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        writers[INDEX_NAME] = _bytes_writer(json.dumps(index, indent=2).encode("utf-8"))
    writers["config.json"] = _bytes_writer(json.dumps(config, indent=2).encode("utf-8"))

    def remove_stale() -> None:
        if len(groups) == 1:  # an earlier sharded save's index would describe shards that are gone
            Path(out_dir, INDEX_NAME).unlink(missing_ok=True)
        for stale in _weight_files(out_dir) - set(names):  # an earlier save's other shards, as transformers does
            Path(out_dir, stale).unlink()

    publish_files(Path(out_dir), writers, before_last=remove_stale)


def _shard_writer(tensors: dict[str, torch.Tensor], group: list[str], save_file: Callable) -> Callable[[Path], None]:
    """Writes the tensors named in ``group`` as one safetensors file, copied to host memory only then."""
    def write(path: Path) -> None:
        shard, seen = {}, set()
        for name in group:
            t = tensors[name].detach().cpu().contiguous()
            if t.data_ptr() in seen:  # safetensors refuses shared storage (e.g. a codebook used by every layer)
                t = t.clone()
            seen.add(t.data_ptr())
            shard[name] = t
        save_file(shard, str(path), metadata={"format": "pt"})
    return write


def _bytes_writer(data: bytes) -> Callable[[Path], int]:
    return lambda path: path.write_bytes(data)


def _weight_files(model_dir: str) -> set[str]:
    """Names of the files in ``model_dir`` that ``write_checkpoint`` writes weights to: the single file or shards."""
    return {name for name in os.listdir(model_dir)
            if name == SINGLE_NAME or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)}
