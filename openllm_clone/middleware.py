"""ASGI middleware for the whole server: API keys and tenants, rate limits, request body
limits, JSON 404s.

It wraps BentoML's app (and the Ray router's), so it covers every route: the /v1 API, the
TGI routes, /metrics, the docs and schema. Only the probes (/livez, /readyz, /healthz)
stay open, because orchestrators call them without credentials; ``/readyz`` answers 503 with
a JSON reason from here while the worker starts (:mod:`openllm_clone.readiness`), so that it
never waits on the model's load. A key names a tenant
(:mod:`openllm_clone.tenants`); the request runs with it in
:data:`~openllm_clone.tenants.current_tenant`, where the routes check its adapter scope.
Adapter management (POST and DELETE on /v1/adapters) and /v1/usage need an admin key when
admin keys exist. Generation requests count against the tenant's limits (429 with
``Retry-After`` beyond them), and every authenticated response carries its
``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from openllm_clone.api.tgi import PATHS as TGI_PATHS
from openllm_clone.arrivals import arriving
from openllm_clone.errors import (
    AuthenticationError,
    NotFoundError,
    OpenLLMCloneError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
)
from openllm_clone.limits import Ticket
from openllm_clone.readiness import readiness
from openllm_clone.settings import Settings
from openllm_clone.tenants import GENERATION_PATHS, KeyEntry, Tenancy, current_tenant, tenancy_for

__all__ = ["PUBLIC_PATHS", "GuardMiddleware"]

PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers]


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send`` that adds ``extra`` headers to the response's start."""
    if not extra:
        return send

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*(message.get("headers") or []), *extra]}
        await send(message)

    return wrapped


async def _reply(
    send: Send,
    error: OpenLLMCloneError,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    tgi: bool = False,
) -> None:
    """Answer with ``error``'s status and JSON body (the one builder, ``to_dict``; TGI's
    ``{error, error_type}`` on TGI's routes, which its clients parse)."""
    payload = {"error": error.message, "error_type": error.error_type} if tgi else error.to_dict()
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _is_tgi(scope: Scope) -> bool:
    """A request to one of TGI's routes (``GET /`` is the docs page, not TGI's)."""
    path = scope.get("path", "")
    return path in TGI_PATHS and (scope.get("method") == "POST" or path == "/info")


async def _refuse(send: Send, exc: OpenLLMCloneError, *, tgi: bool) -> None:
    """A 401 (with ``WWW-Authenticate``), 403 or 429 (with ``Retry-After`` and the
    ``x-ratelimit-*`` headers)."""
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, RateLimitError):
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
        headers += _encode(exc.headers)
    await _reply(send, exc, headers, tgi=tgi)


class GuardMiddleware:
    """Bearer-key authentication and a request body size limit (413)."""

    def __init__(self, app: Any, settings: Callable[[], Settings] | None = None) -> None:
        self.app = app
        self._settings_fn = settings
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = self._settings_fn() if self._settings_fn else Settings.from_env()
        return self._settings

    @property
    def tenancy(self) -> Tenancy:
        return tenancy_for(self.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") == "/readyz":
            not_ready = readiness.error()
            if not_ready is not None:
                retry = str(max(1, math.ceil(not_ready.retry_after))).encode()
                await _reply(send, not_ready, [(b"retry-after", retry)])
                return
        entry: KeyEntry | None = None
        ticket: Ticket | None = None
        extra: list[tuple[bytes, bytes]] = []
        if scope.get("path", "") not in PUBLIC_PATHS and self.tenancy.enabled:
            try:
                entry, ticket, limits = self._admit(scope)
            except OpenLLMCloneError as exc:
                await _refuse(send, exc, tgi=_is_tgi(scope))
                return
            extra = _encode(limits)
        token_ctx = current_tenant.set(entry)
        generation = scope.get("path", "") in GENERATION_PATHS and scope.get("method") == "POST"
        try:
            tenant = entry.tenant if entry is not None else None
            with arriving(tenant) if generation else contextlib.nullcontext():
                await self._guarded(scope, receive, _with_headers(send, extra), self.settings)
        finally:
            current_tenant.reset(token_ctx)
            if ticket is not None:
                ticket.release()

    def _admit(self, scope: Scope) -> tuple[KeyEntry, Ticket | None, list[tuple[str, str]]]:
        """The request's key entry, its rate-limit ticket (generation routes) and the
        ``x-ratelimit-*`` headers; raises the 401, 403 or 429 to answer instead."""
        path, method = scope.get("path", ""), scope.get("method")
        tenancy = self.tenancy
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        entry = tenancy.authenticate(token) if scheme.lower() == "bearer" else None
        if entry is None:
            raise AuthenticationError("missing or invalid API key")
        admin_route = path == "/v1/usage" or (
            path.startswith("/v1/adapters") and method in ("POST", "DELETE")
        )
        if admin_route and not entry.admin:
            raise PermissionDeniedError("this route needs an admin API key")
        if path in GENERATION_PATHS and method == "POST":
            ticket, limits = tenancy.limiter.admit(entry)
            return entry, ticket, limits
        return entry, None, tenancy.limiter.headers(entry)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, settings: Settings
    ) -> None:
        limit = settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(
                send,
                RequestTooLargeError(
                    f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
                ),
            )
            return
        seen = 0

        async def bounded_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        try:
            await self.app(scope, bounded_receive, _json_not_found(scope, send))
        except _TooLarge as exc:
            await _reply(
                send, RequestTooLargeError(f"request body exceeds the limit of {exc.limit} bytes")
            )


def _json_not_found(scope: Scope, send: Send) -> Send:
    """``send`` that turns a plain-text 404 (a route nobody serves) into a JSON error body in
    OpenAI's shape, like every other error of the server."""
    replacing = False

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal replacing
        if message["type"] == "http.response.start" and message.get("status") == 404:
            kind = dict(message.get("headers") or []).get(b"content-type", b"")
            if kind.startswith(b"text/plain"):
                replacing = True
                await _reply(
                    send,
                    NotFoundError(f"no route {scope.get('method', '')} {scope.get('path', '')}"),
                )
                return
        if replacing and message["type"] == "http.response.body":
            return  # the plain "Not Found" text
        await send(message)

    return wrapped


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit
