"""Fuzz audit of load_tokenizer against transformers: config values of the wrong type, negative ids,
special_tokens_map.json, and which ids decode skips (see test_tokenizer.py's fixtures)."""

from __future__ import annotations

import json

import pytest

from nf4lora.model import load_tokenizer
from .test_tokenizer import json_dir, sp_dir  # noqa: F401  (module-scoped fixtures shared with that file)


def _copy_tokenizer(source, target, **files):
    """`target` with `source`'s tokenizer.model or tokenizer.json, and `files` {stem: dict} written as stem.json."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    for stem, content in files.items():
        (target / f"{stem}.json").write_text(json.dumps(content))
    return target


@pytest.mark.parametrize(("stem", "key", "value"), [
    ("tokenizer_config", "bos_token", 5),  # was a TypeError from sentencepiece / tokenizers
    ("tokenizer_config", "eos_token", {"content": ["</s>"]}),
    ("tokenizer_config", "pad_token", {"id": 3}),  # was silently ignored
    ("tokenizer_config", "add_bos_token", "false"),  # was truthy: BOS added
    ("tokenizer_config", "legacy", 1),
    ("tokenizer_config", "added_tokens_decoder", [{"content": "<s>"}]),
    ("generation_config", "bos_token_id", "1"),  # was a TypeError comparing str and int
    ("generation_config", "eos_token_id", [2.0]),  # was taken as an id
    ("generation_config", "pad_token_id", True),
])
@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_wrong_types_are_refused_naming_file_key_and_value(request, tmp_path, kind, stem, key, value):
    source = request.getfixturevalue("sp_dir" if kind == "sentencepiece" else "json_dir")
    _copy_tokenizer(source, tmp_path, **{stem: {key: value}})
    with pytest.raises(ValueError, match=rf"{stem}\.json: {key}=.* valid: ") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value) and repr(value)[:3] in str(info.value)


def test_negative_or_empty_generation_ids_mean_none(sp_dir, tmp_path):  # noqa: F811
    # Llama 1 conversions write pad_token_id -1; it crashed sentencepiece's id_to_piece, and [] an IndexError
    _copy_tokenizer(sp_dir, tmp_path, generation_config={"pad_token_id": -1, "bos_token_id": -1, "eos_token_id": []})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, (2,))  # the .model's own, pad -> EOS
    _copy_tokenizer(sp_dir, tmp_path, generation_config={"eos_token_id": [-1, 2]})
    assert load_tokenizer(tmp_path).eos_ids == (2,)


def test_special_tokens_map_overrides_like_transformers(json_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    stm = {"bos_token": "<|end_of_text|>", "pad_token": {"__type": "AddedToken", "content": "<|eot_id|>"}}
    for tok_config in [{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>"},
                       # with added_tokens_decoder transformers does not read the legacy file
                       {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                        "added_tokens_decoder": {"3": {"content": "<|pad|>", "special": True}}}]:
        _copy_tokenizer(json_dir, tmp_path, tokenizer_config=tok_config, special_tokens_map=stm)
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        tok = load_tokenizer(tmp_path)
        assert (tok.bos_id, tok.pad_id) == (hf.bos_token_id, hf.pad_token_id or hf.eos_token_id), tok_config
    assert (tok.bos_id, tok.pad_id) == (0, None)  # the second config: special_tokens_map.json ignored
    _copy_tokenizer(json_dir, tmp_path, tokenizer_config={}, special_tokens_map={"pad_token": 3})
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: pad_token=3 is not a token"):
        load_tokenizer(tmp_path)


def test_decode_skips_configured_and_marked_special_tokens_like_transformers(json_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    raw = json.loads((json_dir / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        token["special"] = token["content"] == "<|begin_of_text|>"  # tokenizer.json: only BOS is special
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    _copy_tokenizer(tmp_path, tmp_path, tokenizer_config={
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|pad|>",
        "added_tokens_decoder": {"1": {"content": "<|end_of_text|>", "special": True},
                                 "2": {"content": "<|eot_id|>", "special": False},
                                 "3": {"content": "<|pad|>", "special": False}}})  # special as the pad token
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("fox<|pad|> the<|end_of_text|><|eot_id|>a<|pad|>")
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "fox the<|eot_id|>a"


def test_decode_skips_ids_past_the_vocabulary_and_refuses_negative_ones(sp_dir, json_dir, tmp_path):  # noqa: F811
    # a pad id one past the .model (an added <pad> the model's embedding has): decode crashed in sentencepiece
    _copy_tokenizer(sp_dir, tmp_path, generation_config={"pad_token_id": 400})
    sp_tok = load_tokenizer(tmp_path)
    ids = sp_tok.encode("fox")
    assert sp_tok.pad_id == 400 and sp_tok.decode([*ids, 400, 401]) == sp_tok.decode(ids) == "fox"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    json_tok = load_tokenizer(json_dir)
    ids = [*json_tok.encode("fox"), json_tok.vocab_size + 5]
    assert json_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "fox"
    for tok in (sp_tok, json_tok):  # a -100 label: was an IndexError / OverflowError naming no id
        with pytest.raises(ValueError, match="negative token id -100"):
            tok.decode([5, -100])
