"""Data fuzz audit: malformed files and text that no tokenizer takes are refused in one line naming the record."""

import json

import pytest

from nf4lora.trainer.config import UsageError
from nf4lora.trainer.data import detect_format, read_records


@pytest.mark.parametrize("content, refusal", [
    # Python's lenient csv read the rest of the file into that one cell: three rows became one record
    ('prompt,completion\nfirst,"a stray quote\nsecond,b\nthird,c\n', r"line 2: malformed CSV \(unexpected end of data\)"),
    # leniently "say "hi" now" read as 'say hi" now"': the quotes were silently rearranged
    ('text\nfine\n"say "hi" now"\n', r"line 3: malformed CSV \(',' expected after '\"'\)"),
], ids=["unclosed quote", "text after the closing quote"])
def test_a_malformed_csv_quote_is_refused_at_its_row(tmp_path, content, refusal):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(UsageError, match=r"d.csv " + refusal):
        read_records(path)


def test_csv_records_name_the_line_their_row_starts_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",a\nx,y,z\n')
    with pytest.raises(UsageError, match=r"d.csv line 4: row has 3 cells but the header has 2 columns"):
        read_records(path)
    path.write_text('prompt,completion\n"two\nlines",a\nx,y\n')
    assert [r.where[-6:] for r in read_records(path)] == ["line 2", "line 4"]


@pytest.mark.parametrize("value, problem", [
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    ("1" * 5000, r"Exceeds the limit \(4300 digits\) for integer string conversion: value has 5000 digits"),
], ids=["deep", "long-integer"])
def test_json_that_python_cannot_hold_is_one_line_naming_the_line(tmp_path, value, problem):
    """Valid JSON that json.loads fails on without a JSONDecodeError (RecursionError; ValueError from the integer
    digit limit) was a traceback, even in a field no format reads."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b", "meta": ' + value + "}\n")
    with pytest.raises(UsageError, match=rf"d.jsonl line 2: malformed JSON \({problem}\); fix or remove that line"):
        read_records(path)
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"}, {"text": "b", "meta": ' + value + "}]")
    with pytest.raises(UsageError, match=rf"d.json: unreadable JSON \({problem}\); fix the file"):
        read_records(path)


def test_an_unpaired_surrogate_is_refused_naming_record_and_field(tmp_path):
    """A JSON escape of half an emoji (text cut in UTF-16) reached the tokenizer, whose sentencepiece binding failed
    with "Unable to cast Python instance of type <class 'str'> to C++ type" and no record named."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "whole \U0001F600"}) + "\n"
                    + json.dumps({"prompt": "p", "completion": "half \ud83d"}) + "\n")
    records = read_records(path)
    assert records[0].fields["completion"] == "whole \U0001F600"
    with pytest.raises(UsageError, match=r"d.jsonl line 2: field 'completion' holds the unpaired surrogate "
                                         r"'\\ud83d' at character 5; fix or remove that record"):
        detect_format(records)


def test_an_unreadable_parquet_file_is_refused_in_one_line(tmp_path):
    """pyarrow's message for a repeated column name goes on with the whole schema, one field a line."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), path)
    with pytest.raises(UsageError, match=r"d.parquet: unreadable parquet file \(.*text") as info:
        read_records(path)
    assert "\n" not in str(info.value)
