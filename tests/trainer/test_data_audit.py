"""Data audit: files as editors and exporters really write them are read without losing or inventing text."""

import json

import pytest

from nf4lora.trainer.config import UsageError
from nf4lora.trainer.data import Record, detect_format, read_records

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", b'{"prompt": "p", "completion": "c"}\n'),
    ("d.json", b'[{"prompt": "p", "completion": "c"}]'),
    ("d.csv", b"prompt,completion\r\np,c\r\n"),
], ids=["jsonl", "json", "csv"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path, name, content):
    """Excel's "CSV UTF-8" and Notepad start files with a BOM."""
    path = tmp_path / name
    path.write_bytes(BOM + content)
    assert [r.fields for r in read_records(path)] == [{"prompt": "p", "completion": "c"}]


def test_jsonl_lines_are_split_only_at_newlines(tmp_path):
    """JSON allows raw U+2028 / U+0085 inside strings (json.dumps(ensure_ascii=False) writes them raw)."""
    text = "one\u2028two\x85three\u2029four"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "b"}) + "\n",
                    encoding="utf-8")
    records = read_records(path)
    assert [r.fields["text"] for r in records] == [text, "b"]
    assert records[1].where.endswith("line 2")


def test_txt_blocks_keep_form_feeds_and_unicode_line_breaks(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("page one\x0cpage two\u2028same line\r\nnext\r\n\r\nsecond block\r\n".encode())
    assert [r.fields["text"] for r in read_records(path)] == ["page one\x0cpage two\u2028same line\nnext",
                                                              "second block"]


def test_csv_quoted_cells_keep_their_line_breaks(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\r\n"line one\r\nline two",done\r\nx,"a\nb"\r\n')
    assert [r.fields for r in read_records(path)] == [{"prompt": "line one\nline two", "completion": "done"},
                                                      {"prompt": "x", "completion": "a\nb"}]


def test_csv_with_a_repeated_column_name_is_refused(tmp_path):
    """DictReader keeps only the last of two same-named columns, silently dropping the other."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,prompt\na,b,c\n")
    with pytest.raises(UsageError, match=r"d.csv line 1: column 'prompt' appears twice in the header"):
        read_records(path)


def test_a_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    records = read_records(path)
    assert [r.fields for r in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1].where.endswith("line 3")


def test_a_directory_named_like_a_data_file_is_a_usage_error(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(UsageError, match=r"data file .*d.jsonl is a directory; pass a .jsonl/.json/.txt/.csv"):
        read_records(tmp_path / "d.jsonl")


def test_auto_prefers_the_masked_format_when_a_record_also_has_a_text_column():
    """tatsu-lab/alpaca rows hold instruction, input, output and the whole rendered ``text``: training on
    ``text`` would put the prompt in the loss."""
    fields = {"instruction": "add", "input": "1 2", "output": "3", "text": "### Instruction: add ..."}
    assert detect_format([Record(fields, "r0")]) == "instruction"
    assert detect_format([Record({"prompt": "p", "completion": "c", "text": "p c"}, "r0")]) == "prompt-completion"


def test_a_csv_cell_longer_than_the_csv_module_default_limit_is_read(tmp_path):
    """csv stops at 131072 characters per cell unless told otherwise; that was a bare _csv.Error."""
    import csv

    path = tmp_path / "d.csv"
    path.write_text('text\n"' + "long document " * 10_000 + '"\n')
    before = csv.field_size_limit()
    assert len(read_records(path)[0].fields["text"]) == 140_000
    assert csv.field_size_limit() == before  # the process-wide limit is lifted only while reading
