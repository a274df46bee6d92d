"""Writing files and directories so that a crash leaves the old version or the new one, never a mix.

Each is written under a temp name in its final directory (one file system), flushed to disk, renamed over the
final name with ``os.replace`` (atomic on POSIX), and the directory flushed, since the rename survives a power cut
only once the directory entry is on disk. Used by the trainer's run files and checkpoints, the CLI's model outputs
and ``nf4lora.lora.save_adapter``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")) + [path]:
        fsync_path(item, os.O_RDONLY | (os.O_DIRECTORY if item.is_dir() else 0))


def publish_file(path: Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` so that a crash leaves the old content or the new, never a mix."""
    publish_files(path.parent, {path.name: lambda tmp: tmp.write_bytes(data)})


def publish_files(directory: Path, writers: dict[str, Callable[[Path], object]],
                  before_last: Callable[[], object] = lambda: None) -> None:
    """Replace several files of ``directory`` together: ``writers[name](tmp)`` writes each to a temp path beside
    it, flushed to disk, and only once all are written are they renamed into place, in the order given,
    ``before_last()`` running just before the last rename, and the directory flushed. A write or flush that fails
    (a full disk) thus leaves every old file as it was, where replacing file by file would leave new weights beside
    an old config; the temp files are removed and the error re-raised."""
    temps = []
    try:
        for name, write in writers.items():
            temps.append(directory / f".{name}.tmp")
            write(temps[-1])
            fsync_path(temps[-1], os.O_RDONLY)
        for number, (name, tmp) in enumerate(zip(writers, temps), 1):
            if number == len(temps):
                before_last()
            os.replace(tmp, directory / name)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


_REPLACED_PREFIX, _REPLACED_SUFFIX = ".", ".old.tmp"


def replaced_path(final: Path) -> Path:
    """Where :func:`publish_directory` moves the old ``final`` aside while the new one takes its name."""
    return final.with_name(f"{_REPLACED_PREFIX}{final.name}{_REPLACED_SUFFIX}")


def replaced_final(path: Path) -> Path | None:
    """The ``final`` whose :func:`replaced_path` is ``path``, or None when ``path`` is not named as one."""
    name = path.name
    if not (name.startswith(_REPLACED_PREFIX) and name.endswith(_REPLACED_SUFFIX)):
        return None
    final = name[len(_REPLACED_PREFIX):len(name) - len(_REPLACED_SUFFIX)]
    return None if final in ("", ".", "..") else path.with_name(final)  # "...old.tmp" names no final


def restore_replaced(final: Path) -> None:
    """Finish a :func:`publish_directory` that a crash stopped between its two renames: the old ``final`` comes back
    when no new one took its name, and goes when one did."""
    old = replaced_path(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def publish_directory(tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` appear as ``final`` in one rename: flushed to disk first, replacing a
    ``final`` already there (re-saving a step, ``--overwrite``) only once the new one is whole, and the parent then
    flushed, since the rename itself survives a power cut only once the directory entry is on disk. The old ``final``
    is moved aside first and comes back if the new one's rename fails, or at the next publish after a crash."""
    fsync_tree(tmp)
    old = replaced_path(final)
    restore_replaced(final)
    if final.exists():
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:  # the old one comes back, rather than no `final` at all
            os.replace(old, final)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
