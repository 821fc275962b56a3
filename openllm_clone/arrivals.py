"""Generation requests on their way from the HTTP layer to the engine (no torch).

The engine runs its steps on the event loop that serves HTTP, so a request that comes in
during a step is parsed between two steps, in the few loop ticks the engine yields. When
it needs more than that (its body came in a packet of its own, after the headers were
read), it misses the next step and waits a whole step more for its first token. The
guard middleware counts such requests from their headers until they reach the engine
(:meth:`~openllm_clone.engine.engine.Engine.generate`) or end, and the engine, between
two steps, waits a few milliseconds for the count to drop to zero before it schedules
(and between two stages of a step, for a request of a tenant with nothing running).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["arriving", "pending", "pending_tenants", "reached"]

_pending: dict[str, int] = {}  # tenant ("" without keys) -> requests on their way
_current: ContextVar[_Token | None] = ContextVar("openllm_clone_arrival", default=None)


class _Token:
    __slots__ = ("done", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant, self.done = tenant, False

    def end(self) -> None:
        if not self.done:
            self.done = True
            left = _pending[self.tenant] - 1
            if left:
                _pending[self.tenant] = left
            else:
                del _pending[self.tenant]


def pending() -> int:
    """Generation requests between their headers and the engine, in this process."""
    return sum(_pending.values())


def pending_tenants() -> set[str]:
    """The tenants of those requests."""
    return set(_pending)


@contextlib.contextmanager
def arriving(tenant: str | None = None) -> Iterator[None]:
    """Count the request being served (of ``tenant``) as arriving until :func:`reached`
    or the end."""
    token = _Token(tenant or "")
    _pending[token.tenant] = _pending.get(token.tenant, 0) + 1
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
