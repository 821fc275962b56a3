"""Run-time adapters every worker of a server sees, kept across restarts.

``POST /v1/adapters`` loads an adapter in the worker that took the call; once it loaded
(validated against the base model), the worker records ``name -> source`` in a JSON file
beside the model store. Every worker reads the file when it changes (a ``stat`` per
lookup) and registers what it lists, loading each adapter on its first request, as it does
for adapters in the model store; ``DELETE`` removes the entry, and every worker unloads the
adapter once its in-flight requests finish. A restarted server registers the file's
adapters again. Writes take an exclusive lock and replace the file atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from openllm_clone._files import FileStamp, file_stamp, write_atomic

if TYPE_CHECKING:
    from openllm_clone.settings import Settings

__all__ = ["SharedAdapters", "shared_adapters"]

logger = logging.getLogger(__name__)


class SharedAdapters:
    """The shared record of run-time adapters: ``{name: {source, pinned, force}}``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: FileStamp | None = None
        self._entries: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.error("run-time adapter file %s unreadable (%s); ignoring it", self.path, exc)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and "source" in v}

    def entries(self) -> dict[str, dict[str, Any]]:
        """The adapters the file lists now (re-read only when it changed)."""
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._entries = self._read()
            self._stamp = stamp
        return self._entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            yield entries
            text = json.dumps(entries, indent=1, sort_keys=True)
            write_atomic(self.path, text, prefix=".adapters-")

    def put(self, name: str, source: str, *, pinned: bool = False, force: bool = False) -> None:
        """Record ``name`` (after it loaded in this worker)."""
        with self._locked() as entries:
            entries[name] = {"source": source, "pinned": pinned, "force": force}

    def remove(self, name: str) -> bool:
        """Forget ``name``; False when the file did not list it."""
        with self._locked() as entries:
            return entries.pop(name, None) is not None


def shared_adapters(settings: Settings) -> SharedAdapters | None:
    """The server's run-time adapter file (``--adapter-registry``), None when turned off."""
    from openllm_clone._files import runtime_adapters_file

    path = runtime_adapters_file(settings)
    return SharedAdapters(path) if path else None
