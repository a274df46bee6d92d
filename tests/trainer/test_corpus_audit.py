"""Corpus audit: the generated tokenizer keeps every character of what it encodes, like Llama's does."""

import pytest

from nf4lora.trainer.config import DEFAULT_TEMPLATE
from nf4lora.trainer.corpus import legal_clauses, train_tokenizer


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm

    texts = [r["prompt"] + " " + r["completion"] for r in legal_clauses(100, seed=0)]
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("text", [DEFAULT_TEMPLATE.format(prompt="X"), "def f():\n\treturn  1\n", "ﬁ ½ ①"],
                         ids=["template", "code", "nfkc"])
def test_tokenizer_round_trips_newlines_tabs_runs_of_spaces_and_compatibility_characters(sentencepiece_model, text):
    """The default template's newlines used to decode as spaces (NFKC normalization and whitespace collapsing)."""
    assert sentencepiece_model.decode(sentencepiece_model.encode(text)) == text


def test_tokenizer_fits_texts_longer_than_sentencepieces_sentence_limit(tmp_path):
    """Texts over 4192 bytes used to be skipped, and a corpus of only such texts crashed the trainer."""
    import sentencepiece as spm

    texts = [" ".join(f"word{i}x{j}" for j in range(600)) for i in range(3)]
    sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(texts, tmp_path / "t.model", vocab_size=300)))
    assert sp.decode(sp.encode(texts[0])) == texts[0] and len(sp.encode("word1x2")) < len("word1x2")


def test_tokenizer_refuses_texts_with_nothing_to_learn(tmp_path):
    with pytest.raises(ValueError, match=r"train_tokenizer: none of the 2 texts holds a non-space character"):
        train_tokenizer(["", " \n"], tmp_path / "t.model")
