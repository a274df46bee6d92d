import re

import pytest

from nf4lora.trainer.corpus import legal_clauses, train_tokenizer


def test_dataset_is_a_pure_function_of_the_seed():
    assert legal_clauses(50, seed=1) == legal_clauses(50, seed=1)
    assert legal_clauses(50, seed=1) != legal_clauses(50, seed=2)


def test_summaries_restate_the_numbers_of_their_clause():
    for record in legal_clauses(300, seed=0):
        numbers = re.findall(r"\d[\d,]*", record["completion"])
        assert all(n in record["prompt"] for n in numbers), record
        assert record["completion"].count("\n") == 0 and record["prompt"][0].isupper()


def test_dataset_covers_every_clause_type():
    kinds = {r["completion"].split(":")[0] for r in legal_clauses(400, seed=0)}
    assert kinds == {"Confidentiality", "Termination", "Indemnity", "Governing law", "Payment", "Non-solicitation",
                     "Liability cap", "Force majeure"}


def test_tokenizer_has_llama_special_ids_and_round_trips(tmp_path):
    import sentencepiece as spm

    records = legal_clauses(100, seed=0)
    path = train_tokenizer([r["prompt"] for r in records], tmp_path / "tokenizer.model", vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    text = "Payment: Vendor must pay Tenant's invoices within 30 days. Ünïcode falls back to bytes."
    assert sp.decode(sp.encode(text)) == text


def test_bad_record_count_is_rejected():
    with pytest.raises(ValueError, match="n=0 must be a positive number of records"):
        legal_clauses(0)
