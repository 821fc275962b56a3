"""Small file helpers shared by the files the server re-reads when they change."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["FileStamp", "file_stamp", "write_atomic"]

FileStamp = tuple[int, int, int]


def file_stamp(path: str) -> FileStamp | None:
    """``(mtime_ns, size, inode)`` of ``path``, None when it does not exist: a file
    replaced by a rename, or rewritten, gets a new stamp (one ``stat``, cheap per request)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def write_atomic(path: str, text: str, prefix: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file (``prefix``...,
    owner-only, as ``mkstemp`` makes it) in the same folder, fsynced, then renamed over
    ``path``, so a process re-reading it never sees half of it, and its stamp changes
    (a new inode) whatever the clock says."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
