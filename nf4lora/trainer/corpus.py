"""The bundled dataset: templated contract clauses paired with one-line summaries, generated from a seed.

Nothing is downloaded. Each record is ``{"prompt": clause, "completion": summary}``; the summary restates the
clause's type, parties and key numbers, so a model can only learn it by reading the clause (copying the slots),
not by memorising one string per template. ``train_tokenizer`` fits a Llama-style sentencepiece BPE model
(unk=0, bos=1, eos=2, no pad id, byte fallback, no normalization) on the clauses, so the default job needs no
network either.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

PARTIES = ("the Supplier", "the Customer", "the Licensor", "the Licensee", "the Contractor", "the Company",
           "the Landlord", "the Tenant", "the Vendor", "the Purchaser")
JURISDICTIONS = ("England and Wales", "the State of New York", "the State of Delaware", "Ontario", "Singapore",
                 "the State of California", "Ireland", "New South Wales")
INFORMATION = ("technical data", "customer lists", "pricing information", "source code", "business plans",
               "trade secrets")
EVENTS = ("flood", "fire", "earthquake", "pandemic", "war", "strike", "government action")


def _short(party: str) -> str:
    return party.removeprefix("the ")


def _clause(rng: random.Random) -> tuple[str, str]:
    """One (clause, summary) pair; the summary depends on the sampled slot values."""
    a, b = rng.sample(PARTIES, 2)
    cap_a = a[0].upper() + a[1:]
    days = rng.choice((7, 10, 14, 15, 30, 45, 60, 90))
    months = rng.choice((3, 6, 12, 18, 24, 36))
    years = rng.choice((1, 2, 3, 5))
    amount = rng.choice((5, 10, 25, 50, 100, 250, 500)) * 1000
    kind = rng.randrange(8)
    if kind == 0:
        info = rng.choice(INFORMATION)
        clause = (f"{cap_a} shall keep confidential all {info} disclosed by {b} and shall not disclose it to any third "
                  f"party for a period of {years} years after the end of this Agreement, except as required by law.")
        summary = f"Confidentiality: {_short(a)} must keep {_short(b)}'s {info} secret for {years} years."
    elif kind == 1:
        clause = (f"Either party may terminate this Agreement for convenience by giving the other party not less "
                  f"than {days} days' prior written notice. {cap_a} shall pay all fees accrued up to the date of "
                  f"termination.")
        summary = f"Termination: either party may end the contract with {days} days' written notice."
    elif kind == 2:
        clause = (f"{cap_a} shall indemnify and hold harmless {b} against all losses, damages and costs arising out of "
                  f"any breach of this Agreement by {a}, up to a maximum of {amount:,} dollars.")
        summary = f"Indemnity: {_short(a)} covers {_short(b)}'s losses from its breach, capped at {amount:,} dollars."
    elif kind == 3:
        place = rng.choice(JURISDICTIONS)
        clause = (f"This Agreement and any dispute arising out of it shall be governed by the laws of {place}, and "
                  f"the parties submit to the exclusive jurisdiction of the courts of {place}.")
        summary = f"Governing law: the laws and courts of {place} apply."
    elif kind == 4:
        clause = (f"{cap_a} shall pay each invoice issued by {b} within {days} days of receipt. Late payments shall "
                  f"bear interest at {rng.choice((1, 2, 3))} percent per month until paid in full.")
        summary = f"Payment: {_short(a)} must pay {_short(b)}'s invoices within {days} days."
    elif kind == 5:
        clause = (f"During the term and for {months} months thereafter, {a} shall not solicit or hire any employee "
                  f"of {b} without the prior written consent of {b}.")
        summary = f"Non-solicitation: {_short(a)} may not hire {_short(b)}'s staff for {months} months after the term."
    elif kind == 6:
        clause = (f"In no event shall the total liability of {a} under this Agreement exceed {amount:,} dollars, "
                  f"and {a} shall not be liable for any indirect or consequential loss.")
        summary = f"Liability cap: {_short(a)}'s liability is limited to {amount:,} dollars."
    else:
        event = rng.choice(EVENTS)
        clause = (f"Neither party shall be liable for any delay caused by {event} or other events beyond its "
                  f"reasonable control, provided that it notifies the other party within {days} days.")
        summary = f"Force majeure: delays from {event} are excused if notice is given within {days} days."
    return clause, summary


def legal_clauses(n: int = 1200, seed: int = 0) -> list[dict[str, str]]:
    """``n`` records ``{"prompt": clause, "completion": summary}``, a pure function of ``seed``."""
    if n <= 0:
        raise ValueError(f"n={n} must be a positive number of records")
    rng = random.Random(seed)
    return [dict(zip(("prompt", "completion"), _clause(rng))) for _ in range(n)]


def train_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 512) -> Path:
    """Fit a Llama-style sentencepiece BPE model on ``texts`` and write it to ``path`` (``tokenizer.model``).

    As Llama's, it encodes text as is (no NFKC, whitespace kept), so ``decode(encode(text)) == text`` for newlines,
    tabs and runs of spaces too."""
    import sentencepiece as spm

    if not any(text.strip() for text in texts):
        raise ValueError(f"train_tokenizer: none of the {len(texts)} texts holds a non-space character")
    # sentencepiece silently skips sentences longer than max_sentence_length bytes (default 4192).
    longest = max(len(text.encode("utf-8")) for text in texts)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, split_digits=True, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=max(4192, longest))
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path
