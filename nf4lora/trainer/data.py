"""Data: read records, turn them into token ids with masked prompts, pack, and batch deterministically.

Record formats (``--record-format auto`` picks from the first record's keys, the first of these that fits):
- ``instruction``: ``{"instruction": ..., "input": ... (optional), "output": ...}``; the prompt is the instruction,
  followed by a blank line and the input when there is one;
- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``;
- ``text``: ``{"text": ...}``, every token is trained on.
For the first two the prompt goes through ``--template`` (``{prompt}`` placeholder) and its tokens get label -100,
so the loss covers only the response and the EOS that ends it. Prompt and response are tokenized separately, so
the boundary between masked and trained tokens is exact.

An example is ``[bos] + prompt + response + [eos]`` truncated to ``max_len``; its first label is always -100, which
also keeps a packed sequence from learning to predict one example's BOS from the previous example. The order of
micro-batches is a pure function of (seed, micro-batch index), so resuming needs only the step number.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from nf4lora.jsonfile import RepeatedKey, object_without_repeats

from .config import RECORD_FORMATS, UsageError

IGNORE_INDEX = -100
# How epoch e's order is seeded, by version (a checkpoint records the version it was trained with):
# 1: seed + e, which gave seed 43's first epoch the order of seed 42's second (checkpoints saved without a version);
# 2: a hash of (seed, e), so that runs of a seed sweep see unrelated orders.
DATA_ORDERS = (1, 2)
DATA_ORDER = 2
SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")
CSV_CELL_LIMIT = 2**31 - 1  # characters; the largest a C long takes everywhere
# Most specific first, so that a record which also carries its rendered ``text`` (tatsu-lab/alpaca) keeps its
# prompt out of the loss.
FIELDS = {"instruction": ("instruction", "output"), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
_HINT = "each record needs text, prompt+completion, or instruction(+input)+output fields"


@dataclass
class Record:
    """One raw record and where it came from (``data.jsonl line 7``), for error messages."""

    fields: dict[str, Any]
    where: str


@dataclass
class Example:
    """Token ids and aligned labels (``labels[t] = input_ids[t]`` or -100), both of length <= max_len."""

    input_ids: list[int]
    labels: list[int]
    lengths: tuple[int, ...] = ()  # lengths of the packed examples; () means one example

    def segments(self) -> tuple[int, ...]:
        return self.lengths or (len(self.input_ids),)


@dataclass
class Batch:
    """A right-padded micro-batch.

    input_ids, labels, position_ids: (B, T) int64. segment_ids: (B, T) int64, 1..k for the k examples in a row
    and 0 on padding; for packed rows the model turns them into block-diagonal causal attention (see
    ``loop.model_inputs``), and positions restart at 0 for every example.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    packed: bool

    def num_targets(self) -> int:
        """Tokens that carry a loss after the one-position shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "labels", "position_ids", "segment_ids")}
        return Batch(**move, packed=self.packed)


# ----------------------------------------------------------------------------------------------- reading files

def read_records(path: str | Path) -> list[Record]:
    """Read ``.jsonl`` / ``.json`` / ``.txt`` (blank-line separated) / ``.csv`` / ``.parquet`` into records."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} does not exist; pass --data with a {'/'.join(SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"data file {path} has suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt, ".csv": _read_csv}[suffix]
        records = reader(path, _read_text(path))
    if not records:
        raise UsageError(f"data file {path} holds no records; {_HINT}")
    return records


def _read_text(path: Path) -> str:
    """The file as text, a UTF-8 byte order mark dropped and CRLF / CR line ends read as LF."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"data file {path} is a directory; pass a {'/'.join(SUFFIXES)} file") from None
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:  # the offset in the file, byte order mark included
        raise UsageError(f"data file {path} is not UTF-8 text (byte {len(data) - len(body) + exc.start}); save it "
                         f"as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise UsageError(f"data file {path} is empty; {_HINT}")
    return text


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    # Not splitlines(): JSON strings may hold U+2028, U+0085 and friends raw, and those are no line ends here.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=object_without_repeats)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise UsageError(f"{path} line {number}: malformed JSON ({_json_problem(exc)}); fix or remove that "
                             f"line") from None
        if not isinstance(value, dict):
            raise UsageError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
        records.append(Record(value, f"{path} line {number}"))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text, object_pairs_hook=object_without_repeats)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _is_one_line_object(text[:exc.pos]):
            return _read_jsonl(path, text)  # JSON Lines saved as .json, as datasets accepts
        raise UsageError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: unreadable JSON ({_json_problem(exc)}); fix the file") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise UsageError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}), "
                         f"got {type(value).__name__}")
    records = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise UsageError(f"{path} record {index}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, f"{path} record {index}"))
    return records


def _is_one_line_object(head: str) -> bool:
    """Whether the first JSON value of a file, ``head``, is an object on one line: the first record of JSON Lines,
    not a document that is followed by garbage."""
    head = head.strip()
    return head.startswith("{") and "\n" not in head


def _json_problem(exc: ValueError | RecursionError) -> str:
    """What json.loads refused: its own message, a repeated key, or one of the two failures that carry no position
    (nesting past the recursion limit; an integer past Python's 4300-digit limit, whose advice to raise it is not
    the user's)."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RepeatedKey):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]


def _read_txt(path: Path, text: str) -> list[Record]:
    records, block, start = [], [], 0
    for number, line in enumerate(text.split("\n") + [""], start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, f"{path} line {start}"))
            block, start = [], 0
    return records


def _read_csv(path: Path, text: str) -> list[Record]:
    # Whole lines, so quoted cells keep their line breaks. strict: an unclosed quote is an error, not a cell that
    # silently swallows every row after it. Not DictReader: it skips blank lines inside its next(), which hides the
    # line a row starts on.
    reader = csv.reader(io.StringIO(text), strict=True)
    # csv refuses cells over 131072 characters by default; a long document in one cell is ordinary training data.
    limit = csv.field_size_limit(CSV_CELL_LIMIT)
    try:
        return _csv_records(path, reader)
    finally:
        csv.field_size_limit(limit)


def _csv_records(path: Path, reader: Any) -> list[Record]:
    """Rows of a ``csv.reader`` as records keyed by the header row, each named by the line it starts on; blank
    lines between rows are skipped."""
    number = 1  # the line the row being read starts on
    try:
        header = next(reader, [])
        if not header:
            raise UsageError(f"{path} line 1: missing CSV header; the first row must name the columns")
        repeated = [name for i, name in enumerate(header) if name in header[:i]]
        if repeated:
            raise UsageError(f"{path} line 1: column {repeated[0]!r} appears twice in the header; rename one of "
                             f"them")
        records = []
        number = reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    raise UsageError(f"{path} line {number}: row has {len(row)} cells but the header has "
                                     f"{len(header)} columns")
                records.append(Record(dict(zip(header, row)), f"{path} line {number}"))
            number = reader.line_num + 1
    except csv.Error as exc:
        raise UsageError(f"{path} line {number}: malformed CSV ({exc}); a quoted cell ends with a quote followed by "
                         f"a comma or the line end, and a quote inside it is doubled") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"reading {path} needs pyarrow; pip install pyarrow, or convert it to .jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        first_line = str(exc).partition("\n")[0]  # pyarrow's message may go on with a schema dump, line by line
        raise UsageError(f"{path}: unreadable parquet file ({first_line})") from None
    return [Record(row, f"{path} row {index}") for index, row in enumerate(rows)]


# ------------------------------------------------------------------------------------ formats and tokenization

def detect_format(records: Sequence[Record], record_format: str = "auto") -> str:
    """Resolve ``auto`` from the first record, then check every record has that format's fields as strings."""
    if record_format not in RECORD_FORMATS:
        raise UsageError(f"record format {record_format!r} is not valid; use one of {', '.join(RECORD_FORMATS)}")
    if record_format == "auto":
        keys = records[0].fields.keys()
        found = [fmt for fmt, need in FIELDS.items() if set(need) <= keys]
        if not found:
            raise UsageError(f"{records[0].where}: record has keys {sorted(keys)}; {_HINT}")
        record_format = found[0]
    for record in records:
        for key in FIELDS[record_format] + (("input",) if record_format == "instruction" else ()):
            value = record.fields.get(key)
            if key == "input" and value is None:
                continue
            if key not in record.fields:
                raise UsageError(f"{record.where}: record has no {key!r} field (keys: "
                                 f"{_key_list(record.fields)}); {record_format} records need "
                                 f"{' and '.join(FIELDS[record_format])}")
            if not isinstance(value, str):
                raise UsageError(f"{record.where}: field {key!r} is {type(value).__name__}, expected a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a JSON "\\ud83d" escape without its pair; no tokenizer takes it
                raise UsageError(f"{record.where}: field {key!r} holds the unpaired surrogate "
                                 f"{value[exc.start]!r} at character {exc.start}; fix or remove that record") from None
    return record_format


def _key_list(fields: dict[str, Any]) -> str:
    """The record's keys for a one-line message: sorted, a key holding a line break or other unprintable character
    written as its repr."""
    return ", ".join(key if key.isprintable() else repr(key) for key in sorted(fields)) or "none"


def split_prompt(record: Record, record_format: str) -> tuple[str | None, str]:
    """(prompt or None, trained text) of a record whose format has been checked."""
    f = record.fields
    if record_format == "text":
        return None, f["text"]
    if record_format == "prompt-completion":
        return f["prompt"], f["completion"]
    extra = f.get("input") or ""
    return (f"{f['instruction']}\n\n{extra}" if extra.strip() else f["instruction"]), f["output"]


def tokenize(record: Record, record_format: str, encode: Callable[[str], list[int]], bos_id: int | None, eos_id: int,
             template: str, max_len: int) -> Example:
    """``[bos] + template(prompt) + response + [eos]`` with the BOS and the prompt masked, truncated.

    A tokenizer without a BOS id gets no BOS; the first token is never a target either way."""
    prompt, response = split_prompt(record, record_format)
    prompt_ids = encode(template.format(prompt=prompt)) if prompt is not None else []
    head = [bos_id] if bos_id is not None else []
    ids = head + prompt_ids + encode(response) + [eos_id]
    masked = max(1, len(head) + len(prompt_ids))
    labels = [IGNORE_INDEX] * masked + ids[masked:]
    return Example(ids[:max_len], labels[:max_len])


def build_examples(records: Iterable[Record], record_format: str, encode: Callable[[str], list[int]],
                   bos_id: int | None, eos_id: int, template: str, max_len: int) -> tuple[list[Example], int]:
    """Tokenize every record; returns (examples, number dropped because truncation left nothing to train)."""
    examples, dropped = [], 0
    for record in records:
        example = tokenize(record, record_format, encode, bos_id, eos_id, template, max_len)
        if any(label != IGNORE_INDEX for label in example.labels[1:]):
            examples.append(example)
        else:
            dropped += 1
    return examples, dropped


def pack(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Next-fit in order: concatenate examples into rows of at most ``max_len`` tokens, starting a new row when the
    next example does not fit in the current one (examples are never reordered)."""
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_len:
            rows.append(Example(ids, labels, tuple(lengths)))
            ids, labels, lengths = [], [], []
        ids.extend(example.input_ids)
        labels.extend(example.labels)
        lengths.append(len(example.input_ids))
    if ids:
        rows.append(Example(ids, labels, tuple(lengths)))
    return rows


def collate(examples: Sequence[Example], pad_id: int, packed: bool) -> Batch:
    """Right-pad to the longest row; positions restart at 0 for every packed example."""
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        start = 0
        for segment, length in enumerate(example.segments(), start=1):
            position_ids[row, start:start + length] = torch.arange(length)
            segment_ids[row, start:start + length] = segment
            start += length
    return Batch(input_ids, labels, position_ids, segment_ids, packed)


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded random split; at least one validation record when ``fraction > 0`` and there are >= 2 records."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


# -------------------------------------------------------------------------------------------------- batching

class BatchPlan:
    """Deterministic micro-batches: epoch ``e`` visits the rows in ``randperm(n)`` order, its generator seeded by
    ``epoch_seed(seed, e, data_order)``.

    Micro-batch ``m`` is a pure function of ``m``, so the data position saved in a checkpoint is just the number
    of micro-batches consumed. The last micro-batch of an epoch may be smaller.
    """

    def __init__(self, rows: Sequence[Example], micro_batch: int, seed: int, pad_id: int, packed: bool,
                 data_order: int = DATA_ORDER) -> None:
        if not rows:
            raise UsageError("no training examples left after tokenization; check --data and --max-len")
        if data_order not in DATA_ORDERS:
            raise ValueError(f"data_order {data_order!r} is not known; valid: {DATA_ORDERS}")
        self.rows, self.micro_batch, self.seed, self.pad_id, self.packed = rows, micro_batch, seed, pad_id, packed
        self.data_order = data_order
        self.per_epoch = math.ceil(len(rows) / micro_batch)
        self._order: tuple[int, torch.Tensor] | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.data_order))
            self._order = (epoch, torch.randperm(len(self.rows), generator=generator))
        return self._order[1]

    def micro_batch_at(self, index: int) -> Batch:
        epoch, position = divmod(index, self.per_epoch)
        order = self._epoch_order(epoch)[position * self.micro_batch:(position + 1) * self.micro_batch]
        return collate([self.rows[i] for i in order.tolist()], self.pad_id, self.packed)

    def epoch_of(self, index: int) -> float:
        return index / self.per_epoch


def epoch_seed(seed: int, epoch: int, data_order: int = DATA_ORDER) -> int:
    """The generator seed of epoch ``epoch``'s order (``DATA_ORDERS``); a 64-bit hash of both for version 2."""
    if data_order == 1:
        return seed + epoch
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest(), "little")


def eval_batches(rows: Sequence[Example], micro_batch: int, pad_id: int, packed: bool) -> list[Batch]:
    """Validation rows in file order."""
    return [collate(rows[i:i + micro_batch], pad_id, packed) for i in range(0, len(rows), micro_batch)]
