"""Small file helpers shared by the files the server re-reads when they change."""

from __future__ import annotations

import os

__all__ = ["FileStamp", "file_stamp"]

FileStamp = tuple[int, int, int]


def file_stamp(path: str) -> FileStamp | None:
    """``(mtime_ns, size, inode)`` of ``path``, None when it does not exist: a file
    replaced by a rename, or rewritten, gets a new stamp (one ``stat``, cheap per request)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
