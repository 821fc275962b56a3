"""Generation requests on their way from the HTTP layer to the engine (no torch).

The engine runs its steps on the event loop that serves HTTP, so a request that comes in
during a step is parsed between two steps, in the few loop ticks the engine yields. When
it needs more than that (its body came in a packet of its own, after the headers were
read), it misses the next step and waits a whole step more for its first token. The
guard middleware counts such requests from their headers until they reach the engine
(:meth:`~openllm_clone.engine.engine.Engine.generate`) or end, and the engine, between
two steps, waits a few milliseconds for the count to drop to zero before it schedules
(and between two stages of a step, for a request of a tenant with nothing running).
Only requests that came in the last :data:`RECENT_S` count: one that takes longer (an
adapter loading for it, a body that trickles in) is not worth holding steps for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["RECENT_S", "arriving", "pending", "pending_tenants", "reached"]

RECENT_S = 0.05

_pending: dict[_Token, None] = {}  # requests on their way, oldest first
_current: ContextVar[_Token | None] = ContextVar("openllm_clone_arrival", default=None)


class _Token:
    __slots__ = ("since", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant, self.since = tenant, time.perf_counter()

    def end(self) -> None:
        _pending.pop(self, None)


def _recent() -> list[_Token]:
    oldest = time.perf_counter() - RECENT_S
    return [t for t in _pending if t.since >= oldest]


def pending() -> int:
    """Generation requests between their headers and the engine in this process, that
    came in the last :data:`RECENT_S` seconds."""
    return len(_recent()) if _pending else 0


def pending_tenants() -> set[str]:
    """The tenants of those requests ("" without keys)."""
    return {t.tenant for t in _recent()} if _pending else set()


@contextlib.contextmanager
def arriving(tenant: str | None = None) -> Iterator[None]:
    """Count the request being served (of ``tenant``) as arriving until :func:`reached`
    or the end."""
    token = _Token(tenant or "")
    _pending[token] = None
    reset = _current.set(token)
    try:
        yield
    finally:
        _current.reset(reset)
        token.end()


def reached() -> None:
    """The current request has reached the engine (no-op outside :func:`arriving`)."""
    token = _current.get()
    if token is not None:
        token.end()
