"""HTTP routes (FastAPI): OpenLLM-style, OpenAI-compatible and adapter management.

Mounted under ``/v1`` by the BentoML service; knows the :class:`~openllm_clone.llm.LLM`
and nothing of tensors. Every error is a JSON body with the status its exception
carries; bad input is a 4xx and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from openllm_clone.errors import (
    AuthenticationError,
    CapacityError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    OpenLLMCloneError,
)
from openllm_clone.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionOutput,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    LoadAdapterRequest,
    MergedAdapters,
    SamplingParams,
    new_request_id,
    unix_time,
)

from .engine.sequence import RequestOutput, SeqDelta
from .llm import LLM
from .logprobs import (
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_completion_logprobs,
)
from .structured import parse_tool_output, plan_tools

__all__ = ["build_app", "error_response", "json_body", "parse_body", "sse", "validation_error"]

logger = logging.getLogger("openllm_clone.access")



def sse(payload: Any) -> str:
    """One Server-Sent Event carrying JSON (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_response(exc: OpenLLMCloneError) -> JSONResponse:
    headers = {}
    if isinstance(exc, CapacityError):
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return InvalidRequestError(f"{field}: {msg}" if field else str(msg), param=field)


def parse_body(model: type[Any], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _sampling(fn: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        return fn()
    except ValidationError as exc:
        raise validation_error(exc) from exc
    except InvalidRequestError:
        raise
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


async def json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("the request body is not valid JSON") from exc


async def _openllm_request(
    llm: LLM, request: Request
) -> tuple[GenerateRequest, SamplingParams, str | None, list[int]]:
    """Body, sampling parameters, adapter and prompt tokens of an OpenLLM-route request."""
    body = parse_body(GenerateRequest, await json_body(request))
    params = _sampling(body.sampling_params)
    adapter = await _adapter_for(llm, body.adapter_name, body.merged_adapters)
    return body, params, adapter, llm.tokenize(body.prompt)


async def _adapter_for(llm: LLM, adapter: str | None, merged: MergedAdapters | None) -> str | None:
    """The adapter a request uses: a named one, a merge of several, or none."""
    if merged is None:
        return adapter
    if adapter is not None:
        raise InvalidRequestError("give either an adapter or merged_adapters, not both",
                                  param="merged_adapters")
    return await llm.adapters.merged(merged.ids, merged.weights)


def _served_name(llm: LLM, asked: str, adapter: str | None) -> str:
    """The ``model`` a response names: what the client asked for, else what served it."""
    return asked or adapter or llm.name


def build_app(get_llm: Callable[[], LLM]) -> FastAPI:
    """The FastAPI app for ``/v1``; ``get_llm`` returns the process's LLM.

    Authentication and body limits live in :mod:`openllm_clone.middleware`, around
    the whole server.
    """
    app = FastAPI(title="openllm-clone", version="0.1.0", servers=[{"url": "/v1"}])
    router = APIRouter()

    @app.exception_handler(OpenLLMCloneError)
    async def _on_error(_: Request, exc: OpenLLMCloneError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods answer JSON in OpenAI's error shape, like every error."""
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            response = error_response(MethodNotAllowedError(
                f"{request.method} is not allowed on {request.url.path}"))
            if exc.headers and "allow" in {k.lower() for k in exc.headers}:
                response.headers.update(exc.headers)
            return response
        error = OpenLLMCloneError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(OpenLLMCloneError(f"internal error: {type(exc).__name__}"))

    @app.middleware("http")
    async def _access_log(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        logger.info(
            "%s %s %d %.1fms", request.method, request.url.path, response.status_code,
            1000 * (time.perf_counter() - started),
        )
        return response

    # --- OpenLLM routes ----------------------------------------------------------

    @router.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        llm = get_llm()
        body, params, adapter, ids = await _openllm_request(llm, request)
        result = await llm.complete(ids, params, adapter=adapter)
        response = GenerateResponse(
            request_id=result.request_id,
            prompt=body.prompt,
            adapter_name=adapter,
            finished=True,
            outputs=[
                CompletionOutput(index=i, text=t, token_ids=result.token_ids[i],
                                 finish_reason=result.finish_reasons[i])  # type: ignore[arg-type]
                for i, t in enumerate(result.texts)
            ],
            prompt_token_ids=ids,
            usage={"prompt_tokens": result.prompt_tokens,
                   "completion_tokens": result.completion_tokens,
                   "total_tokens": result.prompt_tokens + result.completion_tokens},
        )
        return JSONResponse(response.model_dump())

    @router.post("/generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        llm = get_llm()
        body, params, adapter, ids = await _openllm_request(llm, request)
        stream = await _open_stream(llm, ids, params, adapter)

        async def events() -> AsyncIterator[str]:
            try:
                async for out in stream:
                    yield sse(GenerateResponse(
                        request_id=out.request_id,
                        adapter_name=adapter,
                        finished=out.finished,
                        outputs=[CompletionOutput(index=d.index, text=d.text, token_ids=d.token_ids,
                                                  finish_reason=d.finish_reason)  # type: ignore[arg-type]
                                 for d in out.deltas],
                        usage={"prompt_tokens": out.prompt_tokens,
                               "completion_tokens": out.completion_tokens,
                               "total_tokens": out.prompt_tokens + out.completion_tokens},
                    ).model_dump(exclude_none=True))
            except OpenLLMCloneError as exc:
                yield sse(exc.to_dict())
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return get_llm().metadata()

    @router.post("/metadata")
    async def metadata_post() -> dict[str, Any]:
        return get_llm().metadata()

    # --- OpenAI routes -------------------------------------------------------------

    def _model_cards(llm: LLM) -> list[dict[str, Any]]:
        created = unix_time()
        data = [{"id": llm.name, "object": "model", "created": created, "owned_by": "openllm-clone",
                 "root": llm.runner.info.model_id, "parent": None}]
        for info in llm.adapters.list():
            data.append({"id": info.name, "object": "model", "created": created,
                         "owned_by": "openllm-clone", "root": info.source, "parent": llm.name})
        return data

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": _model_cards(get_llm())}

    @router.get("/models/{model_id:path}")
    async def model_card(model_id: str) -> dict[str, Any]:
        for card in _model_cards(get_llm()):
            if card["id"] == model_id:
                return card
        raise NotFoundError(f"model {model_id!r} does not exist", param="model")

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        llm = get_llm()
        body = parse_body(CompletionRequest, await json_body(request))
        adapter = await _adapter_for(llm, llm.resolve_model_name(body.model), body.merged_adapters)
        params = _sampling(body.sampling_params)
        prompts = body.prompt_list()
        ids = [llm.tokenize(p) if isinstance(p, str) else p for p in prompts]
        for x in ids:  # every prompt is checked before any of them starts generating
            llm.engine.check_prompt(x, params)
        texts = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts] if body.echo else []
        constraint = llm.constraint_for(body.response_format)
        rid = new_request_id("cmpl")
        base = {"id": rid, "object": "text_completion", "created": unix_time(),
                "model": _served_name(llm, body.model, adapter)}
        n = params.n
        if body.stream:
            streams = []
            try:
                for i, x in enumerate(ids):
                    streams.append(await _open_stream(llm, x, params, adapter,
                                                      rid if len(ids) == 1 else f"{rid}-{i}", constraint))
            except BaseException:
                for opened in streams:
                    await opened.aclose()  # type: ignore[attr-defined]
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echoed: set[int] = set()
            offsets: dict[int, int] = {}

            def choice(out: RequestOutput, d: SeqDelta) -> dict[str, Any]:
                text = d.text
                prompt_lp = None
                if body.echo and d.index not in echoed:
                    echoed.add(d.index)
                    text = texts[d.index // n] + text
                    prompt_lp = out.prompt_logprobs
                logprobs = None
                if body.logprobs is not None:
                    logprobs, offsets[d.index] = _completion_logprobs(
                        llm, params, prompt_lp, ids[d.index // n], d.logprobs, offsets.get(d.index, 0))
                return {"index": d.index, "text": text, "logprobs": logprobs,
                        "finish_reason": d.finish_reason}

            merged = streams[0] if len(streams) == 1 else _merge_streams(streams, n)
            return _openai_stream(merged, base, include_usage, choice)
        results = await asyncio.gather(*(
            llm.complete(x, params, adapter=adapter, request_id=rid if len(ids) == 1 else f"{rid}-{i}",
                         constraint=constraint) for i, x in enumerate(ids)))
        choices = []
        for p, result in enumerate(results):
            for i, t in enumerate(result.texts):
                logprobs = None
                if body.logprobs is not None and result.logprobs is not None:
                    logprobs, _ = _completion_logprobs(
                        llm, params, result.prompt_logprobs if body.echo else None, ids[p],
                        result.logprobs[i], 0)
                choices.append({"index": p * n + i, "text": (texts[p] + t) if body.echo else t,
                                "logprobs": logprobs, "finish_reason": result.finish_reasons[i]})
        return {**base, "choices": choices,
                "usage": _usage(sum(r.prompt_tokens for r in results),
                                sum(r.completion_tokens for r in results))}

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        llm = get_llm()
        body = parse_body(ChatCompletionRequest, await json_body(request))
        adapter = await _adapter_for(llm, llm.resolve_model_name(body.model), body.merged_adapters)
        tool_plan = plan_tools(body.tools or [], body.tool_choice)
        messages = body.messages
        if tool_plan is not None:
            messages = _with_system(messages, tool_plan.system_prompt)
            constraint = llm.grammars.json_schema(tool_plan.schema)
        else:
            constraint = llm.constraint_for(body.response_format)
        prompt = llm.chat_prompt(messages)
        ids = llm.tokenize(prompt)
        default_max = max(1, llm.runner.info.max_model_len - len(ids))
        params = _sampling(lambda: body.sampling_params(min(default_max, 4096)))
        rid = new_request_id("chatcmpl")
        base = {"id": rid, "object": "chat.completion", "created": unix_time(),
                "model": _served_name(llm, body.model, adapter)}
        if body.stream and tool_plan is not None:
            result = await llm.complete(ids, params, adapter=adapter, request_id=rid,
                                                         constraint=constraint)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _tool_stream({**base, "object": "chat.completion.chunk"}, result, include_usage,
                                lambda i: _chat_logprobs(llm, params, result, i, body.logprobs))
        if body.stream:
            stream = await _open_stream(llm, ids, params, adapter, rid, constraint)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunk_base = {**base, "object": "chat.completion.chunk"}
            first: set[int] = set()

            def choice(out: RequestOutput, d: SeqDelta) -> dict[str, Any]:
                delta: dict[str, Any] = {"content": d.text} if d.text or d.finish_reason is None else {}
                if d.index not in first:
                    first.add(d.index)
                    delta = {"role": "assistant", "content": d.text}
                logprobs = None
                if body.logprobs:
                    logprobs = {"content": chat_logprobs(llm.token_strings, d.logprobs or []),
                                "refusal": None}
                return {"index": d.index, "delta": delta, "logprobs": logprobs,
                        "finish_reason": d.finish_reason}

            return _openai_stream(stream, chunk_base, include_usage, choice)
        result = await llm.complete(ids, params, adapter=adapter, request_id=rid,
                                                     constraint=constraint)
        choices = []
        for i, text in enumerate(result.texts):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            reason = result.finish_reasons[i]
            if tool_plan is not None:
                content, calls = parse_tool_output(text)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    reason = "tool_calls"
            logprobs = _chat_logprobs(llm, params, result, i, body.logprobs)
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": reason})
        return {**base, "choices": choices,
                "usage": _usage(result.prompt_tokens, result.completion_tokens)}

    # --- adapters ----------------------------------------------------------------------

    @router.get("/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"object": "list", "data": [a.model_dump() for a in get_llm().adapters.list()]}

    @router.post("/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        llm = get_llm()
        body = parse_body(LoadAdapterRequest, await json_body(request))
        record = await llm.adapters.load(body.name, body.source, pinned=body.pinned, force=body.force)
        return JSONResponse(record.info().model_dump(), status_code=200)

    @router.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await get_llm().adapters.unload(name)
        return {"name": name, "deleted": True}

    app.include_router(router)
    _document_bodies(app)

    async def _open_stream(llm: LLM, ids: list[int], params: SamplingParams,
                           adapter: str | None, rid: str | None = None,
                           constraint: Any = None) -> AsyncIterator[RequestOutput]:
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

    return app


# The routes parse their bodies themselves (so that every error is our JSON 400), which
# hides the bodies from FastAPI's OpenAPI: describe them explicitly for clients and fuzzers.
_BODIES = {"/generate": GenerateRequest, "/generate_stream": GenerateRequest,
           "/completions": CompletionRequest, "/chat/completions": ChatCompletionRequest,
           "/adapters": LoadAdapterRequest}


def _document_bodies(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 servers=app.servers)
            models = sorted(set(_BODIES.values()), key=lambda m: m.__name__)
            _, defs = models_json_schema([(m, "validation") for m in models],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            for path, model in _BODIES.items():
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _with_system(messages: list[ChatMessage], text: str) -> list[ChatMessage]:
    """Add ``text`` to the system message (creating one first if needed)."""
    if messages and messages[0].role in ("system", "developer"):
        first = ChatMessage(role="system", content=f"{messages[0].text()}\n\n{text}")
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=text), *messages]


def _chat_logprobs(llm: LLM, params: SamplingParams, result: Any, i: int, asked: bool
                   ) -> dict[str, Any] | None:
    """Chat ``logprobs`` of a finished choice (None unless asked)."""
    if not asked or result.logprobs is None:
        return None
    return {"content": chat_logprobs(llm.token_strings, result.logprobs[i]), "refusal": None}


def _tool_stream(base: dict[str, Any], result: Any, include_usage: bool,
                 logprobs_of: Callable[[int], dict[str, Any] | None]) -> StreamingResponse:
    """Stream a finished tool-calling answer as OpenAI chunks (calls arrive whole; the first
    chunk of a choice carries all its logprobs, when asked)."""

    async def events() -> AsyncIterator[str]:
        for i, text in enumerate(result.texts):
            content, calls = parse_tool_output(text)
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": content
                                                                  if not calls else None},
                                            "logprobs": logprobs_of(i), "finish_reason": None}]})
            if calls:
                delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                yield sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                "finish_reason": None}]})
            yield sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": "tool_calls" if calls
                                            else result.finish_reasons[i]}]})
        if include_usage:
            yield sse({**base, "choices": [],
                       "usage": _usage(result.prompt_tokens, result.completion_tokens)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def _completion_logprobs(llm: LLM, params: SamplingParams, prompt_lp: list[Any] | None,
                         prompt_ids: list[int], entries: list[Any] | None, offset: int
                         ) -> tuple[dict[str, Any], int]:
    """A completions choice's ``logprobs`` (the echoed prompt's first, when given), and the
    text offset after it. Every generated token has an entry, an end-of-sequence token
    included (as vLLM does; lm-eval's loglikelihood drops the last entry as the generated
    one)."""
    strings = llm.token_strings
    tail_lp = entries or []
    if prompt_lp is None:
        return completion_logprobs(strings, tail_lp, offset)
    head, offset = prompt_completion_logprobs(strings, prompt_lp, prompt_ids)
    tail, offset = completion_logprobs(strings, tail_lp, offset)
    return merge_completion_logprobs(head, tail), offset


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _merge_streams(streams: list[AsyncIterator[RequestOutput]], n: int
                         ) -> AsyncIterator[RequestOutput]:
    """Several prompts' streams as one: choice ``i`` of prompt ``p`` becomes index ``p * n + i``;
    usage is the sum over the prompts. An error in one ends all of them."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((p, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((p, exc))
            return
        await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    usage = [(0, 0)] * len(streams)
    live = len(streams)
    try:
        while live:
            p, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            usage[p] = (item.prompt_tokens, item.completion_tokens)
            deltas = [SeqDelta(p * n + d.index, d.text, d.token_ids, d.finish_reason, d.logprobs)
                      for d in item.deltas]
            yield RequestOutput(item.request_id, deltas, sum(u[0] for u in usage),
                                sum(u[1] for u in usage), finished=live == 1 and item.finished,
                                prompt_logprobs=item.prompt_logprobs)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


def _openai_stream(
    stream: AsyncIterator[RequestOutput],
    base: dict[str, Any],
    include_usage: bool,
    choice: Callable[[RequestOutput, SeqDelta], dict[str, Any]],
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        last: RequestOutput | None = None
        try:
            async for out in stream:
                last = out
                if out.deltas:
                    yield sse({**base, "choices": [choice(out, d) for d in out.deltas],
                               **({"usage": None} if include_usage else {})})
        except OpenLLMCloneError as exc:
            yield sse(exc.to_dict())
        if include_usage and last is not None:
            yield sse({**base, "choices": [],
                       "usage": _usage(last.prompt_tokens, last.completion_tokens)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
