"""HTTP client for an openllm-clone server, sync and async, with streaming.

Errors::

    APIError
      APIConnectionError     the server could not be reached
        APITimeoutError      the request took longer than ``timeout``
      APIStatusError         the server answered 4xx/5xx (``status_code``, ``body``)

The address comes from the argument or ``OPENLLM_CLONE_ENDPOINT``; the bearer key
from the argument or ``OPENLLM_CLONE_API_KEY``.

Retries (``max_retries``, default 2): a request is sent again, after ``Retry-After`` or
an exponential back-off, when the server could not be reached (connection refused)
or answered 429/502/503, and a stream when it failed that way before its first event
(a 503 ``unavailable`` event from a Ray replica that died). In every one of those
cases the server returned nothing, so sending again cannot duplicate an answer. A
stream that already yielded events is never retried: the error is raised.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from openllm_clone.protocol import GenerateResponse

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncHTTPClient",
    "HTTPClient",
]

DEFAULT_ENDPOINT = "http://127.0.0.1:3000"
RETRY_STATUSES = frozenset({429, 502, 503})


class APIError(Exception):
    """Base class of client errors."""


class APIConnectionError(APIError):
    """The server could not be reached."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(APIError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code = status_code
        self.body = body
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status_code}: {message or body}")


def _status_error(response: httpx.Response) -> APIStatusError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return APIStatusError(response.status_code, body)


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's Retry-After,
    capped at 30 s, else 0.5 s doubling with jitter."""
    if retry_after:
        try:
            return min(30.0, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return min(8.0, 0.5 * 2**attempt) * (0.5 + random.random() / 2)


def _event_error(event: dict[str, Any]) -> APIStatusError:
    code = event.get("error", {}).get("code") if isinstance(event.get("error"), dict) else None
    return APIStatusError(code if isinstance(code, int) else 500, event)


class _Done(Exception):
    """Internal: the stream sent ``[DONE]``."""


class _Retry(Exception):
    """Internal: this attempt failed before anything was returned; wait, then retry."""

    def __init__(self, delay: float, error: APIError) -> None:
        super().__init__(str(error))
        self.delay = delay
        self.error = error


def _sse_data(line: str) -> str | None:
    return line[5:].strip() if line.startswith("data:") else None


def _payload(prompt: str, adapter_name: str | None, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
    if adapter_name:
        body["adapter_name"] = adapter_name
    return body


def _chat_payload(
    messages: list[dict[str, Any]], model: str | None, stream: bool, params: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": model or "",
        "messages": messages,
        "stream": stream,
        **{k: v for k, v in params.items() if v is not None},
    }


class _Base:
    def __init__(
        self, endpoint: str | None, api_key: str | None, timeout: float, max_retries: int
    ) -> None:
        self.endpoint = (
            endpoint or os.environ.get("OPENLLM_CLONE_ENDPOINT") or DEFAULT_ENDPOINT
        ).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENLLM_CLONE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self.max_retries = max_retries

    def _check(self, response: httpx.Response, attempt: int) -> None:
        """Raise for an error status: ``_Retry`` when it may be sent again."""
        if response.status_code < 400:
            return
        error = _status_error(response)
        if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
            raise _Retry(_backoff(attempt, response.headers.get("retry-after")), error)
        raise error

    def _unreachable(self, exc: httpx.TransportError, what: str, attempt: int) -> Exception:
        """The exception for a transport failure: ``_Retry`` when nothing was sent."""
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"{what} timed out")
        if isinstance(exc, httpx.RemoteProtocolError):
            # The process serving it went away mid-answer (a killed worker, say): the
            # request may have run, so it is not sent again; the caller may retry.
            return APIConnectionError(
                f"{what}: the server closed the connection before the answer ended ({exc}); "
                "retry the request"
            )
        error = APIConnectionError(f"cannot reach {self.endpoint}: {exc}")
        if isinstance(exc, httpx.ConnectError) and attempt < self.max_retries:
            return _Retry(_backoff(attempt), error)
        return error

    def _event(self, line: str, yielded: bool, attempt: int) -> dict[str, Any] | None:
        """The event on an SSE line (None for other lines); raises at ``[DONE]``
        (``_Done``) or on an error event (``_Retry`` if nothing was yielded yet)."""
        data = _sse_data(line)
        if data is None:
            return None
        if data == "[DONE]":
            raise _Done
        event: dict[str, Any] = json.loads(data)
        if "error" in event:
            error = _event_error(event)
            if not yielded and error.status_code in RETRY_STATUSES and attempt < self.max_retries:
                raise _Retry(_backoff(attempt), error)
            raise error
        return event


class HTTPClient(_Base):
    """Blocking client."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(endpoint, api_key, timeout, max_retries)
        self._http = httpx.Client(base_url=self.endpoint, headers=self.headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    response = self._http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc, f"{method} {path}", attempt) from exc
                self._check(response, attempt)
                return response.json() if response.content else None
            except _Retry as retry:
                time.sleep(retry.delay)
                attempt += 1

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        attempt = 0
        while True:
            yielded = False
            try:
                try:
                    with self._http.stream("POST", path, json=body) as response:
                        if response.status_code >= 400:
                            response.read()
                        self._check(response, attempt)
                        for line in response.iter_lines():
                            event = self._event(line, yielded, attempt)
                            if event is not None:
                                yielded = True
                                yield event
                        return
                except _Done:
                    return
                except httpx.TransportError as exc:
                    raise self._unreachable(exc, f"POST {path}", attempt) from exc
            except _Retry as retry:
                time.sleep(retry.delay)
                attempt += 1

    def health(self) -> bool:
        """True when the server is ready."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def metadata(self) -> dict[str, Any]:
        """Model and server facts."""
        return self._request("GET", "/v1/metadata")  # type: ignore[no-any-return]

    def models(self) -> list[str]:
        """Names the OpenAI routes accept: the base model and every adapter."""
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def generate(
        self, prompt: str, *, adapter_name: str | None = None, **params: Any
    ) -> GenerateResponse:
        """Generate a completion (``max_new_tokens``, ``temperature``, ``stop``, ...)."""
        data = self._request("POST", "/v1/generate", json=_payload(prompt, adapter_name, params))
        return GenerateResponse.model_validate(data)

    def generate_stream(
        self, prompt: str, *, adapter_name: str | None = None, **params: Any
    ) -> Iterator[GenerateResponse]:
        """Stream a completion, one event per step."""
        for event in self._stream("/v1/generate_stream", _payload(prompt, adapter_name, params)):
            yield GenerateResponse.model_validate(event)

    def chat(
        self, messages: list[dict[str, Any]], *, model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """OpenAI chat completion (``model`` is an adapter name or the base model's)."""
        return self._request(  # type: ignore[no-any-return]
            "POST", "/v1/chat/completions", json=_chat_payload(messages, model, False, params)
        )

    def chat_stream(
        self, messages: list[dict[str, Any]], *, model: str | None = None, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Streamed chat completion chunks."""
        yield from self._stream(
            "/v1/chat/completions", _chat_payload(messages, model, True, params)
        )

    def list_adapters(self) -> list[dict[str, Any]]:
        """Adapters known to the server."""
        return self._request("GET", "/v1/adapters")["data"]  # type: ignore[no-any-return]

    def load_adapter(
        self, name: str, source: str, *, pinned: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Load an adapter at run time."""
        body = {"name": name, "source": source, "pinned": pinned, "force": force}
        return self._request("POST", "/v1/adapters", json=body)  # type: ignore[no-any-return]

    def unload_adapter(self, name: str) -> dict[str, Any]:
        """Unload an adapter once its in-flight requests finish."""
        return self._request("DELETE", f"/v1/adapters/{name}")  # type: ignore[no-any-return]


class AsyncHTTPClient(_Base):
    """asyncio client with the same methods as :class:`HTTPClient`."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(endpoint, api_key, timeout, max_retries)
        self._http = httpx.AsyncClient(
            base_url=self.endpoint, headers=self.headers, timeout=timeout
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    response = await self._http.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc, f"{method} {path}", attempt) from exc
                self._check(response, attempt)
                return response.json() if response.content else None
            except _Retry as retry:
                await asyncio.sleep(retry.delay)
                attempt += 1

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        attempt = 0
        while True:
            yielded = False
            try:
                try:
                    async with self._http.stream("POST", path, json=body) as response:
                        if response.status_code >= 400:
                            await response.aread()
                        self._check(response, attempt)
                        async for line in response.aiter_lines():
                            event = self._event(line, yielded, attempt)
                            if event is not None:
                                yielded = True
                                yield event
                        return
                except _Done:
                    return
                except httpx.TransportError as exc:
                    raise self._unreachable(exc, f"POST {path}", attempt) from exc
            except _Retry as retry:
                await asyncio.sleep(retry.delay)
                attempt += 1

    async def health(self) -> bool:
        """True when the server is ready."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def metadata(self) -> dict[str, Any]:
        """Model and server facts."""
        return await self._request("GET", "/v1/metadata")  # type: ignore[no-any-return]

    async def models(self) -> list[str]:
        """Names the OpenAI routes accept."""
        return [m["id"] for m in (await self._request("GET", "/v1/models"))["data"]]

    async def generate(
        self, prompt: str, *, adapter_name: str | None = None, **params: Any
    ) -> GenerateResponse:
        """Generate a completion."""
        data = await self._request(
            "POST", "/v1/generate", json=_payload(prompt, adapter_name, params)
        )
        return GenerateResponse.model_validate(data)

    async def generate_stream(
        self, prompt: str, *, adapter_name: str | None = None, **params: Any
    ) -> AsyncIterator[GenerateResponse]:
        """Stream a completion, one event per step."""
        async for event in self._stream(
            "/v1/generate_stream", _payload(prompt, adapter_name, params)
        ):
            yield GenerateResponse.model_validate(event)

    async def chat(
        self, messages: list[dict[str, Any]], *, model: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """OpenAI chat completion."""
        return await self._request(  # type: ignore[no-any-return]
            "POST", "/v1/chat/completions", json=_chat_payload(messages, model, False, params)
        )

    async def chat_stream(
        self, messages: list[dict[str, Any]], *, model: str | None = None, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Streamed chat completion chunks."""
        async for event in self._stream(
            "/v1/chat/completions", _chat_payload(messages, model, True, params)
        ):
            yield event

    async def list_adapters(self) -> list[dict[str, Any]]:
        """Adapters known to the server."""
        return (await self._request("GET", "/v1/adapters"))["data"]  # type: ignore[no-any-return]

    async def load_adapter(
        self, name: str, source: str, *, pinned: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Load an adapter at run time."""
        body = {"name": name, "source": source, "pinned": pinned, "force": force}
        return await self._request("POST", "/v1/adapters", json=body)  # type: ignore[no-any-return]

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Unload an adapter."""
        return await self._request("DELETE", f"/v1/adapters/{name}")  # type: ignore[no-any-return]
