"""The JSON files of model and adapter directories: a file that is not UTF-8, not JSON or not an object is a
one-line ValueError naming it, wherever it is read."""

import json

import pytest

from nf4lora.jsonfile import read_json_object
from nf4lora.lora import load_adapter
from nf4lora.model.config import LlamaConfig

LATIN1 = '{"name": "caf\xe9"}'.encode("latin-1")


@pytest.mark.parametrize(
    "content, message",
    [(LATIN1, r"not UTF-8 text \(byte 0xe9 at offset 13\)"), (b"[1, 2]", "expected a JSON object, got list"),
     (b'{"a": ', "malformed JSON at line 1 column 7")],
    ids=["latin-1", "list", "truncated"],
)
def test_read_json_object_names_the_file_in_one_line(tmp_path, content, message):
    path = tmp_path / "some.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"some\.json: {message}") as error:
        read_json_object(path)
    assert "\n" not in str(error.value)
    assert type(error.value) is ValueError  # not a bare UnicodeDecodeError / JSONDecodeError


def test_read_json_object_returns_the_object(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"r": 8, "name": "café"}), encoding="utf-8")
    assert read_json_object(tmp_path / "ok.json") == {"r": 8, "name": "café"}


def test_a_config_json_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(LATIN1)
    with pytest.raises(ValueError, match=r"config\.json: not UTF-8 text"):
        LlamaConfig.from_file(tmp_path)


@pytest.mark.parametrize("content, message", [(LATIN1, "not UTF-8 text"), (b"[]", "expected a JSON object, got list")])
def test_a_bad_adapter_config_is_named(tmp_path, content, message):
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {message}"):
        load_adapter(None, tmp_path)
