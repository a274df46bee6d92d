"""nf4lora.files: a directory published over an old one replaces it whole, whatever an earlier crash left."""

import pytest

from nf4lora.files import publish_directory, replaced_final, replaced_path


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_a_directory_replaces_the_old_one_even_after_a_crash_left_its_temp(tmp_path):
    """A crash after the old directory was moved aside (and before it was deleted) left `.<name>.old.tmp`; the next
    publish failed on it (os.replace onto a non-empty directory)."""
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "config.json").write_text("old")
    stale = tmp_path / ".checkpoint.old.tmp"
    stale.mkdir()
    (stale / "config.json").write_text("older")
    new = tmp_path / ".checkpoint.new"
    (new / "sub").mkdir(parents=True)
    (new / "config.json").write_text("new")
    (new / "sub" / "weights").write_bytes(b"\x01\x02")
    publish_directory(new, final)
    assert _tree(final) == {"config.json": b"new", "sub/weights": b"\x01\x02"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("name", ["checkpoint-7", "out", ".hidden", "a.old.tmp"])
def test_replaced_final_inverts_replaced_path(tmp_path, name):
    final = tmp_path / name
    assert replaced_final(replaced_path(final)) == final


@pytest.mark.parametrize(
    "name", ["checkpoint-7", ".old.tmp", "..old.tmp", "...old.tmp", "....old.tmp", ".checkpoint-7.tmp", "x.old.tmp"]
)
def test_replaced_final_is_none_for_other_names(tmp_path, name):
    assert replaced_final(tmp_path / name) is None
