"""Data fuzz audit 4: random files are read back with the right line numbers, malformed JSON is refused in one line
naming where, and random records go through tokenize / pack / collate / BatchPlan as a plain reference does."""

import csv
import io
import json
import random

import pytest
import torch

from nf4lora.trainer.config import DEFAULT_TEMPLATE, UsageError
from nf4lora.trainer.data import (IGNORE_INDEX, BatchPlan, Record, build_examples, detect_format, pack,
                                  read_records)

BOS, EOS, PAD = 1, 2, 0
CHARS = "ab c\t\n\u2028\x85\ufeff\"\\,{}[]é😀\x00'xyz"


def random_text(rng, longest=12):
    return "".join(rng.choice(CHARS) for _ in range(rng.randrange(longest + 1)))


def encode(text):
    """A toy tokenizer: one id per character, past the special ids."""
    return [3 + ord(c) % 500 for c in text]


# ------------------------------------------------------------------------------------------------ reading files

def test_csv_rows_after_blank_lines_are_named_by_the_line_they_start_on(tmp_path):
    """csv.DictReader skips blank lines inside its own next(), so a row after one was named by the blank line."""
    rng = random.Random()
    for _ in range(20):
        rows = [{"prompt": random_text(rng), "completion": random_text(rng)} for _ in range(rng.randrange(1, 6))]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["prompt", "completion"], lineterminator="\n")
        writer.writeheader()
        starts = []
        for row in rows:
            out.write("\n" * rng.randrange(3))
            starts.append(out.getvalue().count("\n") + 1)
            writer.writerow(row)
        path = tmp_path / "d.csv"
        path.write_text(out.getvalue(), encoding="utf-8")
        records = read_records(path)
        assert [r.fields for r in records] == rows
        assert [r.where for r in records] == [f"{path} line {n}" for n in starts]


def test_a_bad_csv_row_after_blank_lines_is_named_by_its_own_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\n\n\nc\n")
    with pytest.raises(UsageError, match=r"d.csv line 5: row has 1 cells but the header has 2 columns"):
        read_records(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_json_object_naming_a_key_twice_is_refused(tmp_path, name):
    """json keeps the last of two same-named keys and silently drops the other, as DictReader did with a repeated CSV
    column (which is refused)."""
    path = tmp_path / name
    lines = ['{"prompt": "p", "completion": "c"}', '{"prompt": "kept?", "completion": "c", "prompt": "dropped?"}']
    path.write_text("\n".join(lines) + "\n" if name == "d.jsonl" else "[" + ",\n".join(lines) + "]")
    where = r"d.jsonl line 2: malformed JSON" if name == "d.jsonl" else r"d.json: unreadable JSON"
    with pytest.raises(UsageError, match=where + r" \(key 'prompt' appears twice in one object\); fix") as info:
        read_records(path)
    assert "\n" not in str(info.value)


def test_trailing_garbage_after_a_json_list_is_named_at_its_own_line(tmp_path):
    """The JSON Lines fallback for "Extra data" reported line 1 ("Expecting value") of a valid pretty-printed list."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2) + "\ngarbage\n")
    with pytest.raises(UsageError, match=r"d.json line 9: malformed JSON \(Extra data\); fix the file"):
        read_records(path)


def test_json_lines_saved_as_json_still_name_their_bad_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n{"text": "a"}\n{"text": "b"}\n{"text": }\n')
    with pytest.raises(UsageError, match=r"d.json line 4: malformed JSON \(Expecting value\); fix or remove"):
        read_records(path)


def test_the_byte_offset_of_text_that_is_not_utf8_counts_the_byte_order_mark(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=r"d.jsonl is not UTF-8 text \(byte 16\); save it as UTF-8"):
        read_records(path)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_ends_are_read_as_newlines_and_counted_once(tmp_path, newline):
    path = tmp_path / "d.jsonl"
    path.write_bytes(newline.join(['{"text": "a\\r\\nb"}', "", '{"text": "c"}', '{"text": ']).encode())
    with pytest.raises(UsageError, match=r"d.jsonl line 4: malformed JSON"):
        read_records(path)
    path.write_bytes(newline.join(['{"text": "a\\r\\nb"}', "", '{"text": "c"}']).encode())
    assert [(r.fields["text"], r.where[-6:]) for r in read_records(path)] == [("a\r\nb", "line 1"), ("c", "line 3")]


@pytest.mark.parametrize("keys", [["prompt", "comp\nletion"], ["x\ny", "\u2028"]])
def test_a_missing_field_error_lists_odd_keys_on_one_line(keys):
    """The keys were joined as they are, so a key holding a line break broke the error over two lines."""
    records = [Record({"prompt": "p", "completion": "c"}, "r0"), Record(dict.fromkeys(keys, "v"), "r1")]
    with pytest.raises(UsageError, match=r"^r1: record has no '\w+' field \(keys: ") as info:
        detect_format(records)
    assert "\n" not in str(info.value) and all(repr(k) in str(info.value) for k in keys if not k.isprintable())


# ------------------------------------------------------------------------------ tokenize, pack, batch vs reference

def random_records(rng, record_format):
    records = []
    for i in range(rng.randrange(1, 10)):
        if record_format == "text":
            fields = {"text": random_text(rng, rng.choice([0, 3, 40]))}
        elif record_format == "prompt-completion":
            fields = {"prompt": random_text(rng), "completion": random_text(rng, rng.choice([0, 3, 20]))}
        else:
            fields = {"instruction": random_text(rng), "output": random_text(rng, rng.choice([0, 3, 20]))}
            if rng.random() < 0.6:
                fields["input"] = rng.choice([None, "", " \n", random_text(rng)])
        if rng.random() < 0.3:
            fields["meta"] = rng.choice([1, None, [1], "x"])
        records.append(Record(fields, f"r{i}"))
    return records


def reference_example(fields, record_format, bos, template, max_len):
    """(ids, labels) the way the module docstring states them, built without its helpers."""
    if record_format == "text":
        prompt, response = None, fields["text"]
    elif record_format == "prompt-completion":
        prompt, response = fields["prompt"], fields["completion"]
    else:
        extra = fields.get("input") or ""
        prompt, response = fields["instruction"] + ("\n\n" + extra if extra.strip() else ""), fields["output"]
    head = ([bos] if bos is not None else []) + (encode(template.format(prompt=prompt)) if prompt is not None else [])
    trained = encode(response) + [EOS]
    ids = head + trained
    labels = [IGNORE_INDEX] * len(head) + trained
    labels[0] = IGNORE_INDEX
    return ids[:max_len], labels[:max_len]


def rows_of_batch(batch):
    """Per row: the segments as (ids, labels, positions) lists, and whether padding is clean."""
    rows = []
    for b in range(batch.input_ids.shape[0]):
        seg = batch.segment_ids[b]
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()
        assert (batch.input_ids[b, n:] == PAD).all() and (batch.labels[b, n:] == IGNORE_INDEX).all()
        segments = []
        for s in range(1, int(seg.max()) + 1):
            at = seg == s
            segments.append((batch.input_ids[b, at].tolist(), batch.labels[b, at].tolist(),
                             batch.position_ids[b, at].tolist()))
        rows.append(segments)
    return rows


@pytest.mark.parametrize("record_format", ["text", "prompt-completion", "instruction"])
def test_random_records_reach_the_batches_as_the_reference_builds_them(record_format):
    rng = random.Random()
    for _ in range(40):
        records = random_records(rng, record_format)
        assert detect_format(records) == record_format
        bos, template, max_len = rng.choice([BOS, None]), rng.choice([DEFAULT_TEMPLATE, "{prompt}", "Q {prompt} A"]), \
            rng.randrange(2, 50)
        examples, dropped = build_examples(records, record_format, encode, bos, EOS, template, max_len)
        expected = [reference_example(r.fields, record_format, bos, template, max_len) for r in records]
        kept = [e for e in expected if any(label != IGNORE_INDEX for label in e[1])]
        assert [(e.input_ids, e.labels) for e in examples] == kept and dropped == len(expected) - len(kept)
        if not examples:
            continue
        packed = rng.random() < 0.5
        rows = pack(examples, max_len) if packed else examples
        micro_batch, seed = rng.randrange(1, 4), rng.randrange(2**63)
        plan, resumed = BatchPlan(rows, micro_batch, seed, PAD, packed), BatchPlan(rows, micro_batch, seed, PAD, packed)
        for epoch in range(2):
            seen = []
            for index in range(epoch * plan.per_epoch, (epoch + 1) * plan.per_epoch):
                batch = plan.micro_batch_at(index)
                again = resumed.micro_batch_at(index)  # a fresh plan asked for the index directly, as a resume does
                assert all(torch.equal(getattr(batch, k), getattr(again, k))
                           for k in ("input_ids", "labels", "position_ids", "segment_ids"))
                assert batch.num_targets() == sum(label != IGNORE_INDEX for row in batch.labels.tolist()
                                                  for label in row[1:])
                for segments in rows_of_batch(batch):
                    assert sum(len(ids) for ids, _, _ in segments) <= max_len
                    for ids, labels, positions in segments:
                        assert labels[0] == IGNORE_INDEX and positions == list(range(len(ids)))
                        seen.append((ids, labels))
            # every example exactly once per epoch, none split across rows
            assert sorted(seen) == sorted((e.input_ids, e.labels) for e in examples)
