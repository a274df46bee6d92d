"""Corrupt safetensors files that only safetensors itself used to notice (trailing bytes, overlapping or gapped
data_offsets, a span that does not fit its shape, negative dimensions) are refused by `load_model` with a one-line error naming the file
and the problem, never with a bare SafetensorError from inside the reader."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
import torch

from nf4lora.model import load_model


def _split(file: str) -> tuple[dict, bytes]:
    """(header JSON, data section) of a safetensors file."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def _join(file: str, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _last(header: dict) -> str:
    """Name of the tensor stored last in the data section."""
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


@pytest.fixture
def weights(checkpoints, tmp_path) -> str:
    """model.safetensors of a private copy of the tiny 'gqa' checkpoint, free to corrupt."""
    path = shutil.copytree(checkpoints("gqa"), tmp_path / "m")
    return os.path.join(path, "model.safetensors")


def test_valid_checkpoint_rewritten_unchanged_still_loads(checkpoints, weights):
    """The new checks accept a real file (and `_split`/`_join` alone change nothing that matters)."""
    _join(weights, *_split(weights))
    got = load_model(os.path.dirname(weights), dtype=torch.float32).state_dict()
    want = load_model(checkpoints("gqa"), dtype=torch.float32).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _trailing_junk(header, data):
    return header, data + b"junk", r"corrupt safetensors file: 4 trailing bytes after the tensor data"


def _overlap(header, data):  # the last tensor moved 4 bytes back, file shortened to match
    name = _last(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 4, end - 4]
    return header, data[:-4], rf"'{name}' starts at byte {begin - 4}, expected {begin} \(overlaps the tensor before it\)"


def _gap(header, data):  # the last tensor moved 4 bytes on, file lengthened to match
    name = _last(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4, end + 4]
    return header, data[:begin] + bytes(4) + data[begin:], rf"'{name}' starts at byte {begin + 4}, expected {begin} " \
                                                           r"\(4-byte gap\)"


def _span_not_shape(header, data):
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["shape"] = [63]
    return header, data, rf"'model.norm.weight' spans bytes \[{begin}, {end}\) but shape \[63\] F32 needs 252"


def _negative_dims(header, data):  # the right byte count (64 elements), but no tensor has this shape
    header["model.norm.weight"]["shape"] = [-8, -8]
    return header, data, r"'model.norm.weight' has shape \[-8, -8\]; valid: a list of non-negative integers"


def _metadata_not_strings(header, data):  # passes our header check; safetensors refuses it when opening
    header["__metadata__"] = {"format": 1}
    return header, data, r"not a readable safetensors file: .*invalid type: integer"


@pytest.mark.parametrize("corrupt", [_trailing_junk, _overlap, _gap, _span_not_shape, _negative_dims,
                                     _metadata_not_strings])
def test_corrupt_file_is_refused_with_its_name_and_the_problem(weights, corrupt):
    header, data, problem = corrupt(*_split(weights))
    _join(weights, header, data)
    with pytest.raises(ValueError, match=rf"^{re.escape(weights)}: .*{problem}") as e:
        load_model(os.path.dirname(weights))
    assert "\n" not in str(e.value)


def test_a_shard_index_that_is_not_utf8_is_named(checkpoints, tmp_path):
    shutil.copytree(checkpoints("sharded"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_bytes('{"weight_map": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not UTF-8 text") as error:
        load_model(tmp_path / "m")
    assert type(error.value) is ValueError and "\n" not in str(error.value)


def test_a_save_that_fails_midway_leaves_the_saved_checkpoint_whole(checkpoints, tmp_path, monkeypatch):
    """save_pretrained wrote in place: a crash (or a full disk) while it wrote a shard left a truncated file over the
    last good one. Each file now replaces its old version in one rename."""
    import safetensors.torch

    from nf4lora.model import save_pretrained

    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    save_pretrained(model, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(model, str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_model(str(tmp_path), dtype=torch.float32)


@pytest.mark.parametrize("first, second", [(4096, None), (None, 4096), (4096, 20000)],
                         ids=["shards-then-one-file", "one-file-then-shards", "more-shards-then-fewer"])
def test_a_save_over_an_earlier_one_leaves_none_of_its_weight_files(checkpoints, tmp_path, first, second):
    """An earlier sharded save's index won over a new single model.safetensors, so the directory loaded the old
    weights; its extra shards stayed beside the new ones."""
    from nf4lora.model import save_pretrained

    model = load_model(checkpoints("gqa"), dtype=torch.float32)
    save_pretrained(model, str(tmp_path), max_shard_bytes=first)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    save_pretrained(model, str(tmp_path), max_shard_bytes=second)
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    torch.testing.assert_close(loaded.model.norm.weight, model.model.norm.weight, rtol=0, atol=0)
    files = sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name)
    index = tmp_path / "model.safetensors.index.json"
    expected = ["model.safetensors"] if second is None else sorted(
        {*json.loads(index.read_text())["weight_map"].values(), index.name})
    assert files == expected
