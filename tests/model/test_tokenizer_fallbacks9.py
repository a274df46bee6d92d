"""Fuzz audit 9 of load_tokenizer against transformers: BOS/EOS/pad when tokenizer_config.json lacks the keys."""

from __future__ import annotations

import json
import random

import pytest

from nf4lora.model import load_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "hello world", "naïve café 東京 😀"] * 20
TEXTS = ["hello world", "The lazy fox", "a", "東京 😀"]


def _bpe_json(out, bos: str | None):
    """A byte-level BPE tokenizer.json in `out` whose post-processor puts `bos` before the text (None: nothing)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    return tok


def _reference(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("bos", [None, "<s>", "<|begin_of_text|>"])
def test_absent_bos_token_is_not_taken_from_generation_config(tmp_path, bos):
    """No bos_token key (Falcon's layout): transformers has no BOS; generation_config.json's bos_token_id (Falcon's is
    its EOS) must not become one that the trainer prepends, and a post-processor's BOS is the tokenizer's own."""
    tok_json = _bpe_json(tmp_path, bos)
    rng = random.Random()
    gen_bos, gen_eos = rng.sample(range(4, 250), 2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": gen_bos, "eos_token_id": gen_eos}))
    tok, hf = load_tokenizer(tmp_path), _reference(tmp_path)
    own_bos = None if bos is None else tok_json.token_to_id(bos)
    assert hf.bos_token_id is None  # what transformers says
    assert tok.bos_id == own_bos, (gen_bos, bos)
    assert (tok.eos_id, tok.eos_ids) == (gen_eos, (gen_eos,))  # the trainer needs one; transformers has None
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        # the trainer's pieces: no BOS inside a prompt or a response
        assert tok.encode(text, bos=False, eos=False) == hf.encode(text, add_special_tokens=False), text


def test_post_processor_bos_is_bos_without_any_config(tmp_path):
    """tokenizer.json alone (no tokenizer_config.json, no generation_config.json): the post-processor's BOS is
    bos_id, so encode(bos=False) drops it, as transformers' add_special_tokens=False."""
    tok_json = _bpe_json(tmp_path, "<|begin_of_text|>")
    tok, hf = load_tokenizer(tmp_path), _reference(tmp_path)
    assert tok.bos_id == tok_json.token_to_id("<|begin_of_text|>")
    assert tok.eos_id is None and tok.eos_ids == ()
    text = random.choice(TEXTS)
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False)


def test_training_without_an_eos_token_is_refused_in_one_line(tmp_path):
    """A tokenizer with no EOS anywhere: the trainer appends eos_id to every example, so it must refuse, naming
    where an EOS can be set."""
    from nf4lora.trainer.config import UsageError
    from nf4lora.trainer.job import prepare

    _bpe_json(tmp_path, None)
    assert load_tokenizer(tmp_path).eos_id is None
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    config = pytest.importorskip("nf4lora.trainer.config").TrainConfig(
        model=str(tmp_path), data=str(data), output_dir=str(tmp_path / "run"), device="cpu")
    with pytest.raises(UsageError, match=r"has no EOS token; valid: an eos_token in tokenizer_config\.json") as info:
        prepare(config)
    assert "\n" not in str(info.value)
