"""Whether this process serves yet, and if not, why: what ``/readyz`` answers.

A worker loads its model and start-up adapters in the background while its HTTP server
already answers, so that ``/readyz`` never blocks: 503 with a JSON reason while it starts
(or after a start that failed), 200 once it serves. No torch here: the middleware reads it.
"""

from __future__ import annotations

import threading

from openllm_clone.errors import NotReadyError

__all__ = ["Readiness", "readiness"]


class Readiness:
    """The start-up state of this process: ``None`` (nothing to wait for, or ready), or
    the step it is at, or the reason it could not start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: str | None = None
        self._failed = False

    def starting(self, step: str) -> None:
        """Not ready: ``step`` is what it is doing (``loading the model``)."""
        with self._lock:
            self._waiting, self._failed = step, False

    def failed(self, reason: str) -> None:
        """It will not become ready: ``reason`` says why."""
        with self._lock:
            self._waiting, self._failed = reason, True

    def ready(self) -> None:
        """It serves."""
        with self._lock:
            self._waiting, self._failed = None, False

    @property
    def is_ready(self) -> bool:
        """True once nothing is left to wait for."""
        return self._waiting is None

    def error(self) -> NotReadyError | None:
        """The 503 to answer while not ready, None when ready."""
        with self._lock:
            waiting, failed = self._waiting, self._failed
        if waiting is None:
            return None
        if failed:
            return NotReadyError(f"the server could not start: {waiting}", retry_after=60.0)
        return NotReadyError(f"the server is starting: {waiting}", retry_after=2.0)


readiness = Readiness()  # this process's; set by the BentoML service
