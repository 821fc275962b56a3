"""ASGI middleware for the whole server: API keys, request body limits, JSON 404s.

It wraps BentoML's app, so it covers every route: the /v1 API, /metrics, the docs
and schema. Only the probes (/livez, /readyz, /healthz) stay open, because
orchestrators call them without credentials. Keys are compared in constant time.
Adapter management (POST and DELETE on /v1/adapters) can require a separate admin key.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from openllm_clone.errors import (
    AuthenticationError,
    NotFoundError,
    OpenLLMCloneError,
    RequestTooLargeError,
)
from openllm_clone.settings import Settings

__all__ = ["PUBLIC_PATHS", "GuardMiddleware"]

PUBLIC_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key (no early exit) so timing does not reveal which matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


async def _reply(
    send: Send, error: OpenLLMCloneError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with ``error``'s status and JSON body (the one builder, ``to_dict``)."""
    body = json.dumps(error.to_dict()).encode()
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        path = scope.get("path", "")
        if path not in PUBLIC_PATHS and (settings.api_keys or settings.admin_api_keys):
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            admin_route = path.startswith("/v1/adapters") and scope.get("method") in (
                "POST",
                "DELETE",
            )
            keys = (
                settings.admin_api_keys
                if admin_route and settings.admin_api_keys
                else (settings.api_keys + settings.admin_api_keys)
            )
            if scheme.lower() != "bearer" or not _matches(token, keys):
                await _reply(
                    send,
                    AuthenticationError(
                        "admin API key required"
                        if admin_route and settings.admin_api_keys
                        else "missing or invalid API key"
                    ),
                    [(b"www-authenticate", b"Bearer")],
                )
                return
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
