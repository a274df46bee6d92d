import csv
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nf4lora.trainer.config import DEFAULT_TEMPLATE, UsageError
from nf4lora.trainer.data import (IGNORE_INDEX, BatchPlan, Example, Record, build_examples, collate, detect_format,
                                  pack, read_records, split_validation, tokenize)

BOS, EOS, PAD = 1, 2, 0


def encode(text):
    """A toy tokenizer: one id per character, offset past the special ids."""
    return [3 + ord(c) % 200 for c in text]


def example(record, fmt, max_len=10_000, template=DEFAULT_TEMPLATE):
    return tokenize(Record(record, "test"), fmt, encode, BOS, EOS, template, max_len)


# --------------------------------------------------------------------------------------------- file formats

ROWS = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_structured_format_reads_the_same_records(tmp_path, suffix):
    records = read_records(write(tmp_path / f"d{suffix}", ROWS))
    assert [r.fields for r in records] == ROWS


def test_json_accepts_a_single_key_wrapper(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS}))
    assert [r.fields for r in read_records(path)] == ROWS


def test_txt_records_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first line\nsecond line\n\n\nthird\n")
    records = read_records(path)
    assert [r.fields for r in records] == [{"text": "first line\nsecond line"}, {"text": "third"}]
    assert records[1].where.endswith("line 5")


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UsageError, match="needs pyarrow; pip install pyarrow"):
        read_records(path)


@pytest.mark.parametrize("name, content, match", [
    ("d.jsonl", "", "is empty"),
    ("d.jsonl", "  \n\n", "is empty"),
    ("d.jsonl", '{"text": "a"}\n{"text": "b"\n', r"line 2: malformed JSON"),
    ("d.jsonl", '{"text": "a"}\n[1, 2]\n', r"line 2: expected a JSON object, got list"),
    ("d.json", '[{"text": "a"},\n {"text": }]', r"line 2: malformed JSON"),
    ("d.json", '{"a": 1, "b": 2}', "expected a JSON list of objects"),
    ("d.csv", "prompt,completion\na,b\nc,d,e\n", r"line 3: row has 3 cells but the header has 2 columns"),
    ("d.xml", "<a/>", r"suffix '.xml'; use one of .jsonl, .json, .txt, .csv, .parquet"),
])
def test_malformed_files_name_the_problem_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        read_records(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.txt", "d.csv"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=rf"data file .*{name} is not UTF-8 text \(byte 13\); save it as UTF-8"):
        read_records(path)


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------- record formats

@pytest.mark.parametrize("fields, fmt", [
    ({"text": "t"}, "text"),
    ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ({"instruction": "i", "input": "x", "output": "o"}, "instruction"),
    ({"instruction": "i", "output": "o"}, "instruction"),
])
def test_auto_detects_the_record_format(fields, fmt):
    assert detect_format([Record(fields, "r0")]) == fmt


def test_record_missing_a_field_names_the_record_and_field():
    records = [Record({"prompt": "p", "completion": "c"}, "d.jsonl line 1"), Record({"prompt": "p"}, "d.jsonl line 2")]
    with pytest.raises(UsageError, match=r"d.jsonl line 2: record has no 'completion' field \(keys: prompt\)"):
        detect_format(records)


def test_record_with_unknown_fields_lists_what_is_expected():
    with pytest.raises(UsageError, match=r"keys \['question'\]; each record needs text, prompt\+completion"):
        detect_format([Record({"question": "q"}, "r0")])


def test_non_string_field_is_rejected():
    with pytest.raises(UsageError, match="field 'text' is int, expected a string"):
        detect_format([Record({"text": 3}, "r0")])


def test_text_records_train_on_every_token_but_bos():
    ex = example({"text": "hello"}, "text")
    assert ex.input_ids == [BOS, *encode("hello"), EOS]
    assert ex.labels == [IGNORE_INDEX, *encode("hello"), EOS]


def test_prompt_tokens_are_masked_and_the_response_is_not():
    ex = example({"prompt": "question", "completion": "answer"}, "prompt-completion")
    prompt_ids = encode(DEFAULT_TEMPLATE.format(prompt="question"))
    assert ex.input_ids == [BOS, *prompt_ids, *encode("answer"), EOS]
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*encode("answer"), EOS]


def test_instruction_records_join_instruction_and_input_in_the_masked_prompt():
    template = "Q: {prompt}\nA: "
    ex = example({"instruction": "sum", "input": "1 2", "output": "3"}, "instruction", template=template)
    prompt_ids = encode(template.format(prompt="sum\n\n1 2"))
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*encode("3"), EOS]
    no_input = example({"instruction": "sum", "input": "", "output": "3"}, "instruction", template=template)
    assert no_input.input_ids[1:-2] == encode(template.format(prompt="sum"))


def test_truncation_keeps_the_prefix_and_drops_examples_left_without_targets():
    ex = example({"text": "abcdefgh"}, "text", max_len=4)
    assert ex.input_ids == [BOS, *encode("abc")] and len(ex.labels) == 4
    records = [Record({"prompt": "a long prompt", "completion": "c"}, "r0"),
               Record({"prompt": "", "completion": "c"}, "r1")]
    examples, dropped = build_examples(records, "prompt-completion", encode, BOS, EOS, "{prompt}", max_len=5)
    assert dropped == 1 and len(examples) == 1


# ---------------------------------------------------------------------------------------- packing and batches

@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(2, 12), min_size=1, max_size=20), st.integers(12, 40))
def test_packing_keeps_every_token_within_max_len_and_in_order(lengths, max_len):
    examples = [Example(list(range(100 * i, 100 * i + n)), [IGNORE_INDEX] + list(range(100 * i + 1, 100 * i + n)))
                for i, n in enumerate(lengths)]
    rows = pack(examples, max_len)
    assert all(len(r.input_ids) <= max_len and sum(r.lengths) == len(r.input_ids) for r in rows)
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]
    assert [n for r in rows for n in r.lengths] == lengths


def test_packed_batch_restarts_positions_and_separates_segments():
    rows = pack([Example([1, 5, 6], [IGNORE_INDEX, 5, 6]), Example([1, 7], [IGNORE_INDEX, 7])], max_len=8)
    batch = collate(rows + [Example([1, 9], [IGNORE_INDEX, 9])], PAD, packed=True)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]]
    assert batch.labels[1, 2:].tolist() == [IGNORE_INDEX] * 3
    # The first token of each packed example is never a target, so no loss crosses a boundary.
    assert batch.labels[0, 3].item() == IGNORE_INDEX


def test_packed_attention_is_block_diagonal_causal_in_the_model():
    """A packed row gives each example exactly the logits it gets alone (attention stays inside it)."""
    from nf4lora.model import Llama, LlamaConfig
    from nf4lora.trainer.loop import model_inputs

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4)).eval()
    a, b = Example([1, 5, 6, 7], [IGNORE_INDEX, 5, 6, 7]), Example([1, 9, 10], [IGNORE_INDEX, 9, 10])
    packed = collate(pack([a, b], max_len=16), PAD, packed=True)
    with torch.no_grad():
        together = model(**model_inputs(packed))[0]
        alone_a = model(torch.tensor([a.input_ids]))[0]
        alone_b = model(torch.tensor([b.input_ids]))[0]
    # fp32 on the same kernels; only the summation order over masked keys differs.
    torch.testing.assert_close(together[:4], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[4:], alone_b, rtol=1e-5, atol=1e-5)


def test_num_targets_counts_shifted_unmasked_labels():
    batch = collate([Example([1, 5, 6], [IGNORE_INDEX, 5, 6]), Example([1, 7], [IGNORE_INDEX, IGNORE_INDEX])], PAD,
                    packed=False)
    assert batch.num_targets() == 2


def test_batch_plan_is_a_pure_function_of_the_index_and_covers_each_epoch():
    rows = [Example([1, i], [IGNORE_INDEX, i]) for i in range(3, 13)]
    plan = BatchPlan(rows, micro_batch=3, seed=5, pad_id=PAD, packed=False)
    assert plan.per_epoch == 4
    epoch0 = [t for i in range(4) for t in plan.micro_batch_at(i).input_ids[:, 1].tolist() if t != PAD]
    assert sorted(epoch0) == list(range(3, 13))
    again = BatchPlan(rows, micro_batch=3, seed=5, pad_id=PAD, packed=False)
    assert torch.equal(again.micro_batch_at(6).input_ids, plan.micro_batch_at(6).input_ids)
    epoch1 = [t for i in range(4, 8) for t in plan.micro_batch_at(i).input_ids[:, 1].tolist() if t != PAD]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)


def test_validation_split_is_seeded_and_disjoint():
    records = [Record({"text": str(i)}, f"r{i}") for i in range(20)]
    train, val = split_validation(records, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert {r.where for r in train}.isdisjoint(r.where for r in val)
    assert [r.where for r in split_validation(records, 0.25, seed=1)[1]] == [r.where for r in val]
