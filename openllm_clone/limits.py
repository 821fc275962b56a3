"""Per-tenant rate limits and usage totals (no torch).

:class:`RateLimiter` keeps, per tenant, the requests and tokens of the last minute (a
sliding window) and the requests in flight. A request over a limit is refused with a
429 (:class:`~openllm_clone.errors.RateLimitError`) before it reaches the engine; the
tokens of a request count when it finishes (prompt + completion), so a request that is
admitted may take a tenant past its tokens-per-minute, and the next ones wait until the
window has room again (as OpenAI's limits behave).

With ``--workers N`` every worker process keeps its own counters and enforces
``ceil(limit / N)`` of each limit, so a tenant never exceeds its limit in total (it may be
refused a little early when the workers' shares are used unevenly).

:class:`UsageMeter` adds up requests and tokens per tenant and adapter since start
(``GET /v1/usage``), and with ``--usage-log`` appends each finished request to a JSON-lines
file (:class:`UsageLog`) that outlives restarts and that ``openllm-clone usage``
summarises per day.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from openllm_clone.errors import RateLimitError


class KeyEntry(Protocol):
    """What the limits read of a key (:class:`openllm_clone.tenants.KeyEntry`, which
    imports this module: a protocol here keeps the two out of an import circle)."""

    @property
    def tenant(self) -> str: ...

    @property
    def requests_per_minute(self) -> int | None: ...

    @property
    def tokens_per_minute(self) -> int | None: ...

    @property
    def max_concurrent(self) -> int | None: ...


__all__ = ["AdapterLabels", "RateLimiter", "Ticket", "UsageLog", "UsageMeter", "summarize_usage"]

WINDOW = 60.0


def _reset(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(math.ceil(seconds))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class _State:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0


@dataclass
class Ticket:
    """An admitted request; :meth:`release` when its response has ended."""

    limiter: RateLimiter | None
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released and self.limiter is not None:
            self.released = True
            self.limiter._release(self.tenant)


class RateLimiter:
    """Sliding-window requests and tokens per minute, and concurrency, per tenant."""

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()  # the engine observer records tokens from its thread

    def _limit(self, value: int | None) -> int | None:
        return None if value is None else max(1, math.ceil(value * self.share))

    def _state(self, tenant: str, now: float) -> _State:
        state = self._states.setdefault(tenant, _State())
        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= now - WINDOW:
            state.token_sum -= state.tokens.popleft()[1]
        return state

    def admit(self, entry: KeyEntry) -> tuple[Ticket, list[tuple[str, str]]]:
        """Count a request of ``entry``'s tenant, or raise :class:`RateLimitError`.
        Returns the ticket and the ``x-ratelimit-*`` headers for the response."""
        rpm = self._limit(entry.requests_per_minute)
        tpm = self._limit(entry.tokens_per_minute)
        concurrent = self._limit(entry.max_concurrent)
        with self._lock:
            now = self.clock()
            state = self._state(entry.tenant, now)
            waits: list[tuple[float, str]] = []
            if rpm is not None and len(state.requests) >= rpm:
                waits.append(
                    (
                        state.requests[len(state.requests) - rpm] + WINDOW - now,
                        f"{rpm} requests per minute",
                    )
                )
            if tpm is not None and state.token_sum >= tpm:
                waits.append((self._tokens_free_in(state, tpm, now), f"{tpm} tokens per minute"))
            if concurrent is not None and state.in_flight >= concurrent:
                waits.append((1.0, f"{concurrent} concurrent requests"))
            if waits:
                wait, what = max(waits)
                raise RateLimitError(
                    f"rate limit of tenant {entry.tenant!r} reached: {what}; retry in "
                    f"{_reset(wait)}",
                    retry_after=max(wait, 0.001),
                    headers=self._headers(entry, state, now, rpm, tpm),
                )
            state.requests.append(now)
            state.in_flight += 1
            headers = self._headers(entry, state, now, rpm, tpm)
        return Ticket(self, entry.tenant), headers

    def headers(self, entry: KeyEntry) -> list[tuple[str, str]]:
        """The ``x-ratelimit-*`` headers without counting a request."""
        with self._lock:
            now = self.clock()
            state = self._state(entry.tenant, now)
            return self._headers(
                entry,
                state,
                now,
                self._limit(entry.requests_per_minute),
                self._limit(entry.tokens_per_minute),
            )

    @staticmethod
    def _tokens_free_in(state: _State, tpm: int, now: float) -> float:
        """Seconds until the window's tokens drop below ``tpm``."""
        total = state.token_sum
        for stamp, tokens in state.tokens:
            total -= tokens
            if total < tpm:
                return stamp + WINDOW - now
        return WINDOW

    def _headers(
        self, entry: KeyEntry, state: _State, now: float, rpm: int | None, tpm: int | None
    ) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if rpm is not None:
            reset = state.requests[0] + WINDOW - now if state.requests else 0.0
            out += [
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, rpm - len(state.requests)))),
                ("x-ratelimit-reset-requests", _reset(reset)),
            ]
        if tpm is not None:
            reset = state.tokens[0][0] + WINDOW - now if state.tokens else 0.0
            out += [
                ("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, tpm - state.token_sum))),
                ("x-ratelimit-reset-tokens", _reset(reset)),
            ]
        return out

    def record_tokens(self, tenant: str, tokens: int) -> None:
        """Count a finished request's prompt + completion tokens."""
        if tokens <= 0:
            return
        with self._lock:
            now = self.clock()
            state = self._state(tenant, now)
            state.tokens.append((now, tokens))
            state.token_sum += tokens

    def _release(self, tenant: str) -> None:
        with self._lock:
            state = self._states.get(tenant)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1


class UsageLog:
    """Append-only JSON lines, one per finished request. Lines are buffered and written
    with one ``write`` (``O_APPEND``, so workers sharing the file never interleave a
    line) and an ``fsync`` at most ``flush_every`` seconds after the first unwritten one,
    and at exit: a killed process loses at most that last second."""

    def __init__(self, path: str, flush_every: float = 1.0) -> None:
        self.path = path
        self.flush_every = flush_every
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atexit.register(self.flush)

    def record(self, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **fields}, separators=(",", ":"))
        with self._lock:
            self._lines.append(line + "\n")
            if self._timer is None:
                self._timer = threading.Timer(self.flush_every, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            data, self._lines = "".join(self._lines), []
            self._timer = None
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def summarize_usage(path: str) -> list[dict[str, Any]]:
    """Totals per (UTC day, tenant, adapter) of a usage log, oldest day first."""
    totals: dict[tuple[str, str, str], dict[str, Any]] = {}
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            day = time.strftime("%Y-%m-%d", time.gmtime(row.get("ts", 0)))
            key = (day, str(row.get("tenant", "-")), str(row.get("adapter") or ""))
            t = totals.setdefault(
                key,
                {
                    "day": key[0],
                    "tenant": key[1],
                    "adapter": key[2],
                    "requests": 0,
                    "errors": 0,
                    "cancelled": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                },
            )
            t["requests"] += 1
            status = row.get("status")
            t["cancelled"] += status == "cancelled"
            t["errors"] += status not in ("ok", "cancelled")
            t["prompt_tokens"] += int(row.get("prompt_tokens", 0))
            t["completion_tokens"] += int(row.get("completion_tokens", 0))
    return [totals[k] for k in sorted(totals)]


class UsageMeter:
    """Requests and tokens per (tenant, adapter) since start: every request that reached
    the engine, with the tokens it computed (a cancelled one's too, counted as
    ``cancelled``; ``errors`` are the ones that failed)."""

    def __init__(self, log: UsageLog | None = None) -> None:
        self._totals: dict[tuple[str, str], dict[str, int]] = {}
        self._lock = threading.Lock()
        self.log = log

    def record(
        self, tenant: str, adapter: str | None, status: str, prompt: int, completion: int
    ) -> None:
        with self._lock:
            row = self._totals.setdefault(
                (tenant, adapter or ""),
                {
                    "requests": 0,
                    "errors": 0,
                    "cancelled": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                },
            )
            row["requests"] += 1
            if status == "cancelled":
                row["cancelled"] += 1
            elif status != "ok":
                row["errors"] += 1
            row["prompt_tokens"] += prompt
            row["completion_tokens"] += completion
        if self.log is not None:
            self.log.record(
                tenant=tenant,
                adapter=adapter,
                status=status,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )

    def snapshot(self) -> dict[str, Any]:
        """``{tenants: {name: {totals, adapters: {adapter: totals}}}}``."""
        out: dict[str, Any] = {}
        with self._lock:
            items = [(k, dict(v)) for k, v in self._totals.items()]
        for (tenant, adapter), row in sorted(items):
            t = out.setdefault(
                tenant,
                {
                    "requests": 0,
                    "errors": 0,
                    "cancelled": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "adapters": {},
                },
            )
            for key, value in row.items():
                t[key] += value
            t["adapters"][adapter or "(base)"] = row
        for t in out.values():
            t["total_tokens"] = t["prompt_tokens"] + t["completion_tokens"]
        return {"tenants": out}


class AdapterLabels:
    """The ``adapter`` label of the per-tenant metrics: the adapters with the most traffic
    (prompt + completion tokens since start) get their own value, the rest ``other``.

    Prometheus cannot take a series back in BentoML's multiprocess mode (prometheus_client
    does not implement label removal there), so the ranking moves with hysteresis: while
    fewer than ``capacity`` adapters hold a label, a new one takes one; then an unlabelled
    adapter takes the place of the labelled one with the least traffic once it has at least
    twice that traffic. The one it displaces keeps its series at the value it had (a
    counter that stops), and its later traffic counts as ``other``, so the values of all
    labels still add up to the total. At most ``2 * capacity`` adapters ever get a label in
    a process (a re-promoted adapter reuses its own); past that the labels stay as they
    are. So a label holds at most ``2 * capacity + 1`` values, however many adapters come
    and go.
    """

    OTHER = "other"

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._traffic: dict[str, int] = {}
        self._labelled: set[str] = set()
        self._ever: set[str] = set()
        self._lock = threading.Lock()

    def label(self, adapter: str | None) -> str:
        """The label value for ``adapter`` now (the base model is ``""``)."""
        name = adapter or ""
        with self._lock:
            return name if self._holds(name) else self.OTHER

    def record(self, adapter: str | None, tokens: int) -> str:
        """Count a finished request's tokens for ``adapter``; its label value after it."""
        name = adapter or ""
        with self._lock:
            self._traffic[name] = self._traffic.get(name, 0) + tokens
            if self._holds(name):
                return name
            if len(self._labelled) < self.capacity:  # room, but no more names to give
                return self.OTHER
            weakest = min(self._labelled, key=lambda a: (self._traffic.get(a, 0), a))
            if self._traffic[name] >= 2 * max(self._traffic.get(weakest, 0), 1) and self._admit(
                name
            ):
                self._labelled.discard(weakest)
                return name
            return self.OTHER

    def _holds(self, name: str) -> bool:
        """``name`` has a label, or takes one while there is room."""
        return name in self._labelled or (len(self._labelled) < self.capacity and self._admit(name))

    def _admit(self, name: str) -> bool:
        if name not in self._ever and len(self._ever) >= 2 * self.capacity:
            return False
        self._ever.add(name)
        self._labelled.add(name)
        return True

    def labelled(self) -> set[str]:
        with self._lock:
            return set(self._labelled)
