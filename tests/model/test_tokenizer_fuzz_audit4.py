"""Fuzz audit 4 of load_tokenizer against transformers: the text after a special token in a sentencepiece model, and
the tokens a fine-tune added past its tokenizer.model (ChatML next to a Llama 2 / Mistral tokenizer.model)."""

from __future__ import annotations

import json
import random
import re

import pytest

from nf4lora.model import load_tokenizer

# ">" glued to words: BPE learns ">>" and ">t" merges, which crossed the end of the "<unk>" the text after a special
# token used to be encoded behind
GLUED = ["a>the x>fox >>quick k>the >the >fox s>the >t >th /s>x", "The quick brown fox jumps. 東京 😀 naïve"] * 30
WORDS = [">the", ">>fox", ">", "the", "fox", " >x", "quick", "東京", "😀", "e\u0301", "\n", "  ", "12"]
ADDED = ["<|im_start|>", "<|im_end|>", "<tool>", "[MASK]"]


def _llama_sp(out, corpus):
    """A Llama-style (identity normalization, dummy prefix, byte fallback) 400-piece BPE tokenizer.model in `out`."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                                   allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False)
    return out


def _reference(tokenizer, **options):
    """transformers' LlamaTokenizer over the same pieces (transformers >= 5 builds it from vocab + merges)."""
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip("needs transformers >= 5 (LlamaTokenizer(vocab=, merges=))")
    vocab = {tokenizer.sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, **options)


def _random_text(rng, pieces, inserts):
    """`pieces` joined at random, with each of `inserts` (special or added token text) put in 1..3 times."""
    text = "x" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))  # no leading space: see tokenizer.py
    for token in rng.choices(inserts, k=rng.randint(1, 3)):
        cut = rng.randint(1, len(text))
        text = text[:cut] + token + text[cut:]
    return text


def test_text_after_a_special_token_keeps_every_character_like_transformers(tmp_path):
    tok = load_tokenizer(_llama_sp(tmp_path, GLUED))
    assert tok.sp.piece_to_id(">>") != tok.sp.unk_id()  # the merge the old "<unk>" prefix lost characters to
    hf = _reference(tok)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(150):
        text = _random_text(rng, WORDS, ["</s>", "<s>", "<unk>"])
        ids = tok.encode(text)
        assert ids == hf.encode(text), (seed, text)  # "a</s>>the" lost its ">"
        plain = re.sub("<unk>|</s>|<s>", "", text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == plain, (seed, text)


@pytest.fixture(scope="module")
def chatml_dirs(tmp_path_factory):
    """Two copies of one fine-tune: tokenizer.model plus ChatML tokens added past it (<|im_start|>, the EOS
    <|im_end|>, and <tool>, [MASK] not special), listed in tokenizer.json (transformers 5's save) in the first and
    only in tokenizer_config.json's added_tokens_decoder (transformers 4's) in the second."""
    with_json = _llama_sp(tmp_path_factory.mktemp("chatml_json"), GLUED)
    hf = _reference(load_tokenizer(with_json))
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>"], "eos_token": "<|im_end|>"})
    hf.add_tokens(["<tool>", "[MASK]"])
    hf.save_pretrained(str(with_json))
    decoder_only = tmp_path_factory.mktemp("chatml_decoder")
    (decoder_only / "tokenizer.model").write_bytes((with_json / "tokenizer.model").read_bytes())
    added = json.loads((with_json / "tokenizer.json").read_text())["added_tokens"]
    (decoder_only / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "legacy": False,
        "added_tokens_decoder": {str(t["id"]): {"content": t["content"], "special": t["special"]} for t in added}}))
    return with_json, decoder_only


@pytest.mark.parametrize("listed_in", ["tokenizer.json", "added_tokens_decoder"])
def test_tokens_added_past_the_sentencepiece_model_like_transformers(chatml_dirs, listed_in):
    transformers = pytest.importorskip("transformers")
    with_json, decoder_only = chatml_dirs
    hf = transformers.AutoTokenizer.from_pretrained(str(with_json))
    tok = load_tokenizer(with_json if listed_in == "tokenizer.json" else decoder_only)
    # was the .model's </s>: generation would not stop on the <|im_end|> the fine-tune writes
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (1, hf.convert_tokens_to_ids("<|im_end|>"))
    # any id but the byte pieces: transformers writes U+FFFD for every byte of a run that is not UTF-8, sentencepiece
    # (the reference of a .model) only for the bad ones
    extra = [i for i in range(hf.vocab_size + len(ADDED)) if i >= tok.vocab_size or not tok.sp.is_byte(i)]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(150):
        text = _random_text(rng, WORDS, [*ADDED, "</s>"])
        ids = tok.encode(text)
        assert ids == hf.encode(text), (seed, text)  # "<|im_start|>" was spelt out byte by byte
        for some in (ids, [*ids, *rng.sample(extra, 5)]):
            assert tok.decode(some) == hf.decode(some, skip_special_tokens=True), (seed, text, some)


@pytest.mark.parametrize(("name", "content"), [
    ("tokenizer.json", {"added_tokens": [{"id": 400}]}),  # no content
    ("tokenizer.json", {"added_tokens": {"id": 400, "content": "<x>"}}),
    ("tokenizer_config.json", {"added_tokens_decoder": {"400": "<x>"}}),
    ("tokenizer_config.json", {"added_tokens_decoder": {"400": {"content": 7}}}),
])
def test_malformed_added_tokens_are_one_line_naming_file_and_key(tmp_path, name, content):
    _llama_sp(tmp_path, GLUED)
    (tmp_path / name).write_text(json.dumps(content))
    key = next(iter(content))
    with pytest.raises(ValueError, match=rf"{name}: {key}=.* does not list added tokens; valid: ") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
