"""load_tokenizer for a sentencepiece model trained here and a tokenizer.json built here."""

from __future__ import annotations

import json

import pytest

from nf4lora.model import load_tokenizer
from nf4lora.model.tokenizer import HFTokenizer, SentencePieceTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Llamas hum; alpacas spit. Quantized weights take four bits each!",
    "Numbers 12345 and 67890, symbols #@%& and unicode: café, naïve, 東京.",
] * 20
SAMPLES = ["Hello world", "  leading spaces and trailing ", "The lazy fox 123 café 東京 😀", "a", ""]


def _train_sentencepiece(out, **options):
    """A 400-piece BPE sentencepiece model (byte fallback, unk 0, bos 1, eos 2, no pad) trained on CORPUS into
    ``out``/tokenizer.model, with ``options`` added to the trainer's."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(out / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, **options)
    return out


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return _train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def llama_sp_dir(tmp_path_factory):
    """A sentencepiece model trained with Llama 2's options: no normalization, spaces kept, digits split."""
    return _train_sentencepiece(
        tmp_path_factory.mktemp("llama_sp"), normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
    )


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("tj")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}, "pad_token": "<|pad|>"}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return out


def test_sentencepiece_encodes_like_sentencepiece_with_bos(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, (2,))
    assert tok.pad_id == tok.eos_id  # the model defines no pad piece: fall back to EOS
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == [1, *sp.encode(text)]
        assert tok.decode(ids) == sp.decode(sp.encode(text))
    assert tok.decode(tok.encode("The lazy fox 123 café")) == "The lazy fox 123 café"
    assert tok.encode("fox", bos=False, eos=True) == [*sp.encode("fox"), 2]


def test_sentencepiece_honours_tokenizer_config_flags(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("fox")[-1] == 2 and tok.encode("fox")[0] != 1


def test_tokenizer_json_matches_transformers_fast_tokenizer(json_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    tok = load_tokenizer(json_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 2, 3)
    assert tok.eos_ids == (2, 1)  # the tokenizer's EOS first, then generation_config's others
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_json_bos_and_eos_can_be_forced(json_dir):
    tok = load_tokenizer(json_dir)
    body = tok.encode("fox", bos=False)
    assert body[0] != tok.bos_id
    assert tok.encode("fox", eos=True) == [tok.bos_id, *body, tok.eos_id]


def test_sentencepiece_encodes_like_transformers_llama_tokenizer(llama_sp_dir):
    transformers = pytest.importorskip("transformers")
    try:  # transformers >= 5 builds its LlamaTokenizer from vocab + merges (it converts a .model only via protobuf)
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip("needs transformers >= 5 (LlamaTokenizer(vocab=, merges=))")
    tok = load_tokenizer(llama_sp_dir)
    # what transformers' SentencePieceExtractor takes from tokenizer.model: every piece in id order, merges derived
    vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    hf = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)
    # no leading whitespace (transformers' Metaspace adds no dummy prefix before one, sentencepiece and we do);
    # special-token text is covered in test_tokenizer_audit.py
    texts = ["Hello world", "trailing spaces  ", "The lazy fox 123 café 東京 😀", "a", "",
             "Hi\nthere  two\ttab", "Llamas spit 4-bit weights!", "ünïcödé ÅÆØ ½ ﬁ"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(("kind", "generation", "expected"), [
    # the .model itself says BOS 1, EOS 2 and no pad: generation_config.json must win over it, but for its BOS
    # (transformers reads none there: "<s>")
    pytest.param("sentencepiece", {"bos_token_id": 3, "eos_token_id": [4, 2], "pad_token_id": 5}, (1, 4, 5, (4, 2)),
                 id="sentencepiece"),
    # tokenizer.json knows no special tokens of its own: without generation_config.json there would be none
    pytest.param("tokenizer.json", {"bos_token_id": 0, "eos_token_id": [2, 1], "pad_token_id": 3}, (0, 2, 3, (2, 1)),
                 id="tokenizer.json"),
])
def test_special_ids_fall_back_to_generation_config(request, tmp_path, kind, generation, expected):
    name = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
    source = request.getfixturevalue("sp_dir" if kind == "sentencepiece" else "json_dir")
    (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    for tok_config in [{"model_max_length": 128},  # no special tokens at all
                       # or ones the vocabulary lacks (a config written for another tokenizer)
                       {"bos_token": {"content": "<missing>"}, "eos_token": "<missing>", "pad_token": "<missing>"}]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
        tok = load_tokenizer(tmp_path)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == expected, tok_config
        ids = tok.encode("fox", bos=True, eos=True)
        assert ids[0] == expected[0] and ids[-1] == expected[1] and expected[0] not in ids[1:]


def test_missing_or_invalid_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has neither tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        load_tokenizer(tmp_path)
