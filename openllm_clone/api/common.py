"""What every route family shares: SSE framing, JSON error bodies, body parsing, the
adapter a request names, and opening a stream. Imports no torch (the Ray router formats
errors with it, on a machine that may hold no model)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from openllm_clone.errors import (
    AdapterNotFoundError,
    AuthenticationError,
    CapacityError,
    InvalidRequestError,
    OpenLLMCloneError,
)
from openllm_clone.protocol import ChatMessage, MergedAdapters, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = [
    "adapter_for",
    "error_response",
    "json_body",
    "llm_of",
    "merged_adapter",
    "open_stream",
    "parse_body",
    "sampling",
    "served_name",
    "sse",
    "usage",
    "validation_error",
    "with_system",
]


def llm_of(request: Request) -> LLM:
    """The process's LLM, for a route of an app made by :func:`~openllm_clone.api.build_app`
    or :func:`~openllm_clone.api.build_root_app` (which keep its getter in ``app.state``)."""
    llm: LLM = request.app.state.get_llm()
    return llm


def sse(payload: Any) -> str:
    """One Server-Sent Event carrying JSON (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_response(exc: OpenLLMCloneError) -> JSONResponse:
    """The JSON error (OpenAI's shape) and the status the exception carries."""
    headers = {}
    if isinstance(exc, CapacityError):
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    """A pydantic error as a 400 naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return InvalidRequestError(f"{field}: {msg}" if field else str(msg), param=field)


def parse_body(model: type[Any], body: Any) -> Any:
    """Validate ``body`` as ``model`` (a 400 on failure)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def sampling(fn: Callable[[], SamplingParams]) -> SamplingParams:
    """Build sampling parameters; every failure is a 400."""
    try:
        return fn()
    except ValidationError as exc:
        raise validation_error(exc) from exc
    except InvalidRequestError:
        raise
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


async def json_body(request: Request) -> Any:
    """The request's JSON body (a 400 when it is not JSON)."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("the request body is not valid JSON") from exc


async def adapter_for(llm: LLM, adapter: str | None, merged: MergedAdapters | None) -> str | None:
    """The adapter a request uses: a named one, a merge of several, or none."""
    if merged is None:
        return adapter
    if adapter is not None:
        raise InvalidRequestError(
            "give either an adapter or merged_adapters, not both", param="merged_adapters"
        )
    return await merged_adapter(
        llm,
        merged.ids,
        merged.weights,
        strategy=merged.merge_strategy,
        density=merged.density,
        majority_sign_method=merged.majority_sign_method,
    )


async def merged_adapter(
    llm: LLM,
    ids: list[str],
    weights: list[float],
    *,
    strategy: str = "linear",
    density: float | None = None,
    majority_sign_method: str | None = None,
) -> str:
    """The name of a merge of adapters ``ids`` (``strategy`` and its parameters: see
    :mod:`openllm_clone.adapters.merge`); a part outside the key's scope is refused as a
    missing one (before anything is read)."""
    for name in ids:
        if not llm.visible(name):
            raise AdapterNotFoundError(
                f"merged_adapters names {name!r}, which is not a loaded adapter",
                param="merged_adapters",
            )
    return await llm.adapters.merged(
        ids,
        weights,
        strategy=strategy,
        density=density,
        majority_sign_method=majority_sign_method,
    )


def with_system(messages: list[ChatMessage], text: str) -> list[ChatMessage]:
    """Add ``text`` to the system message (creating one first if needed): a tool plan's
    instructions, for the chat and Responses routes."""
    if messages and messages[0].role in ("system", "developer"):
        first = ChatMessage(role="system", content=f"{messages[0].text()}\n\n{text}")
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=text), *messages]


def served_name(llm: LLM, asked: str, adapter: str | None) -> str:
    """The ``model`` a response names: what the client asked for, else what served it."""
    return asked or adapter or llm.name


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def open_stream(
    llm: LLM,
    ids: list[int],
    params: SamplingParams,
    adapter: str | None,
    rid: str | None = None,
    constraint: Any = None,
) -> AsyncIterator[RequestOutput]:
    """Start a stream and wait for its first event, so early errors become HTTP errors."""
    # The engine enforces --timeout: a late request ends with an error event.
    stream = llm.stream(ids, params, adapter=adapter, request_id=rid, constraint=constraint)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[RequestOutput]:
        try:
            if first is not None:
                yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return rest()
