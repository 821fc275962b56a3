"""Small file helpers: files the server re-reads when they change, and where its files
live beside BentoML's (standard library only: the engine, the runners and the adapters
import this, never the model store)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openllm_clone.settings import Settings

__all__ = ["FileStamp", "bentoml_home", "file_stamp", "runtime_adapters_file", "write_atomic"]

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


def runtime_adapters_file(settings: Settings) -> str | None:
    """Where a server records its run-time adapters (:mod:`openllm_clone.adapters.shared`):
    ``--adapter-registry``, else a file beside the model store named after the model and
    the port (so two servers never share one by accident, and a restart finds its own);
    None when turned off."""
    chosen = settings.adapter_registry
    if chosen is not None:
        return None if chosen.lower() == "none" else os.path.abspath(chosen)
    model = settings.model_name or settings.model.split(":")[0]  # a tag's version changes
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    home = bentoml_home()
    return os.path.join(home, "openllm-clone", f"adapters-{name[-80:]}-{settings.port}.json")


def bentoml_home() -> str:
    """BentoML's home folder by BentoML's own rule (``$BENTOML_HOME`` with variables and
    ``~`` expanded, else ``~/bentoml``), found without importing BentoML: an engine in a
    Ray worker or on a machine with only torch runs without it."""
    home = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
    while (expanded := os.path.expanduser(os.path.expandvars(home))) != home:
        home = expanded
    return home
