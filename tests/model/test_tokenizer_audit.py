"""Special tokens written literally in the text, checked against transformers (see test_tokenizer.py's fixtures)."""

from __future__ import annotations

import json

import pytest

from nf4lora.model import load_tokenizer
from .test_tokenizer import json_dir, llama_sp_dir  # noqa: F401  (module-scoped fixtures shared with that file)


def test_tokenizer_json_forcing_bos_eos_keeps_literal_special_tokens(json_dir):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    tok = load_tokenizer(json_dir)
    for text in ["fox<|eot_id|>", "<|begin_of_text|>fox", "<|begin_of_text|>fox<|eot_id|>", ""]:
        body = hf(text, add_special_tokens=False)["input_ids"]
        for bos in (True, False):
            for eos in (True, False):
                want = [tok.bos_id] * bos + body + [tok.eos_id] * eos
                assert tok.encode(text, bos=bos, eos=eos) == want, (text, bos, eos)


def test_sentencepiece_splits_literal_special_tokens_like_transformers(llama_sp_dir):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip("needs transformers >= 5 (LlamaTokenizer(vocab=, merges=))")
    tok = load_tokenizer(llama_sp_dir)
    vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    for text in ["fox</s>", "fox</s>bar", "<s>[INST] hi [/INST] a </s><s>[INST] b", "<unk>x", "a<s>"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert tok.decode([0, *tok.encode("x", bos=False)]) == "x"  # unk is special: skipped, not " ⁇ "


def test_sentencepiece_legacy_keeps_dummy_prefix_after_special_tokens(llama_sp_dir, tmp_path):  # noqa: F811
    (tmp_path / "tokenizer.model").write_bytes((llama_sp_dir / "tokenizer.model").read_bytes())
    plain = load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    legacy = load_tokenizer(tmp_path)
    bar = plain.sp.encode("bar")  # "▁bar": with sentencepiece's dummy prefix
    assert legacy.encode("fox</s>bar", bos=False) == [*plain.sp.encode("fox"), 2, *bar]
    assert plain.encode("fox</s>bar", bos=False)[-len(bar):] != bar
