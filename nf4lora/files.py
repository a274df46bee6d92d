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
    write_file_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Replace the file ``path`` with what ``write(tmp)`` writes to a temp path beside it: the temp file is flushed,
    renamed over ``path``, and the rename flushed. A write that fails (a full disk) removes its partial temp file
    and re-raises."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        move_file_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_file_into_place(written: Path, path: Path) -> None:
    """Replace ``path`` with the complete file ``written`` (on the same file system) in one rename: flushed to disk
    first, and the rename flushed after."""
    fsync_path(written, os.O_RDONLY)
    os.replace(written, path)
    fsync_dir(path.parent)


def publish_directory(tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` appear as ``final`` in one rename: flushed to disk first, replacing a
    ``final`` already there (re-saving a step, ``--overwrite``) only once the new one is whole, and the parent then
    flushed, since the rename itself survives a power cut only once the directory entry is on disk."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")
        if old.exists():  # left by a crash between the two renames below, after which `final` was whole again
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
