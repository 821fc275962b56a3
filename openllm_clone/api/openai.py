"""OpenAI-compatible routes: ``GET /v1/models`` (and ``/v1/models/{id}``),
``POST /v1/completions``, ``POST /v1/chat/completions``; streaming, ``n``, several prompts
per completions request, logprobs, tools and structured output."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from openllm_clone.errors import NotFoundError, OpenLLMCloneError
from openllm_clone.logprobs import (
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_completion_logprobs,
)
from openllm_clone.protocol import (
    SERVER_VERSION,
    TGI_MODEL_NAME,
    ChatCompletionRequest,
    CompletionRequest,
    RequestOutput,
    SamplingParams,
    SeqDelta,
    new_request_id,
    unix_time,
)
from openllm_clone.tenants import cap_max_tokens, current_tenant
from openllm_clone.tools import parse_tool_output, plan_tools

from .common import (
    adapter_for,
    json_body,
    llm_of,
    open_stream,
    parse_body,
    sampling,
    served_name,
    sse,
    usage,
    with_system,
)

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["routes"]


routes = APIRouter()


def _model_cards(llm: LLM) -> list[dict[str, Any]]:
    """The base model (when the key may use it) and each adapter the key may use."""
    created = unix_time()
    entry = current_tenant.get()
    data = []
    if entry is None or entry.base_model:
        data.append(
            {
                "id": llm.name,
                "object": "model",
                "created": created,
                "owned_by": "openllm-clone",
                "root": llm.info.model_id,
                "parent": None,
            }
        )
    for info in llm.visible_adapters():
        data.append(
            {
                "id": info.name,
                "object": "model",
                "created": created,
                "owned_by": "openllm-clone",
                "root": info.source,
                "parent": llm.name,
            }
        )
    return data


@routes.get("/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _model_cards(llm_of(request))}


@routes.get("/models/{model_id:path}")
async def model_card(model_id: str, request: Request) -> dict[str, Any]:
    for card in _model_cards(llm_of(request)):
        if card["id"] == model_id:
            return card
    raise NotFoundError(f"model {model_id!r} does not exist", param="model")


@dataclass
class _Completion:
    """A parsed completions request: its prompts (token ids; the texts when echoed)."""

    body: CompletionRequest
    adapter: str | None
    params: SamplingParams
    ids: list[list[int]]
    texts: list[str]
    constraint: Any
    rid: str
    base: dict[str, Any]

    def request_id(self, p: int) -> str:
        """Prompt ``p``'s engine request id (the response's id when there is one prompt)."""
        return self.rid if len(self.ids) == 1 else f"{self.rid}-{p}"


@routes.post("/completions")
async def completions(request: Request) -> Any:
    llm = llm_of(request)
    body = parse_body(CompletionRequest, await json_body(request))
    adapter = await adapter_for(llm, llm.resolve_model_name(body.model), body.merged_adapters)
    params = sampling(body.sampling_params)
    prompts = body.prompt_list()
    ids = [llm.tokenize(p) if isinstance(p, str) else p for p in prompts]
    for x in ids:  # every prompt is checked before any of them starts generating
        llm.engine.check_prompt(x, params)
    texts = (
        [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts] if body.echo else []
    )
    base = _response_base(llm, "cmpl", "text_completion", body.model, adapter)
    rid = base["id"]
    req = _Completion(
        body, adapter, params, ids, texts, llm.constraint_for(body.response_format), rid, base
    )
    if body.stream:
        return await _stream_completion(llm, req)
    return await _whole_completion(llm, req)


async def _stream_completion(llm: LLM, req: _Completion) -> StreamingResponse:
    """All prompts' streams as one SSE stream (choice ``p * n + i``)."""
    body, n = req.body, req.params.n
    streams = []
    try:
        for p, x in enumerate(req.ids):
            streams.append(
                await open_stream(
                    llm, x, req.params, req.adapter, req.request_id(p), req.constraint
                )
            )
    except BaseException:
        for opened in streams:
            await opened.aclose()  # type: ignore[attr-defined]
        raise
    echoed: set[int] = set()
    offsets: dict[int, int] = {}

    def choice(out: RequestOutput, d: SeqDelta) -> dict[str, Any]:
        text = d.text
        prompt_lp = None
        if body.echo and d.index not in echoed:
            echoed.add(d.index)
            text = req.texts[d.index // n] + text
            prompt_lp = out.prompt_logprobs
        logprobs = None
        if body.logprobs is not None:
            logprobs, offsets[d.index] = _completion_logprobs(
                llm, prompt_lp, req.ids[d.index // n], d.logprobs, offsets.get(d.index, 0)
            )
        return {
            "index": d.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
        }

    merged = streams[0] if len(streams) == 1 else _merge_streams(streams, n)
    return _openai_stream(merged, req.base, _include_usage(body), choice)


async def _whole_completion(llm: LLM, req: _Completion) -> dict[str, Any]:
    """Every prompt to the end (scheduled together), then one response."""
    body, n = req.body, req.params.n
    results = await asyncio.gather(
        *(
            llm.complete(
                x,
                req.params,
                adapter=req.adapter,
                request_id=req.request_id(p),
                constraint=req.constraint,
            )
            for p, x in enumerate(req.ids)
        )
    )
    choices = []
    for p, result in enumerate(results):
        for i, t in enumerate(result.texts):
            logprobs = None
            if body.logprobs is not None and result.logprobs is not None:
                logprobs, _ = _completion_logprobs(
                    llm,
                    result.prompt_logprobs if body.echo else None,
                    req.ids[p],
                    result.logprobs[i],
                    0,
                )
            choices.append(
                {
                    "index": p * n + i,
                    "text": (req.texts[p] + t) if body.echo else t,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reasons[i],
                }
            )
    return {
        **req.base,
        "choices": choices,
        "usage": usage(
            sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        ),
    }


@routes.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    llm = llm_of(request)
    body = parse_body(ChatCompletionRequest, await json_body(request))
    adapter = await adapter_for(llm, llm.resolve_model_name(body.model), body.merged_adapters)
    tool_plan = plan_tools(body.tools or [], body.tool_choice)
    messages = body.messages
    if tool_plan is not None:
        messages = with_system(messages, tool_plan.system_prompt)
        constraint = llm.grammars.json_schema(tool_plan.schema)
    else:
        constraint = llm.constraint_for(body.response_format)
    ids = llm.tokenize(llm.chat_prompt(messages))
    default_max = max(1, llm.info.max_model_len - len(ids))
    params = sampling(lambda: body.sampling_params(cap_max_tokens(min(default_max, 4096))))
    base = _response_base(llm, "chatcmpl", "chat.completion", body.model, adapter)
    rid = base["id"]
    chunk_base = {**base, "object": "chat.completion.chunk"}
    if body.stream and tool_plan is None:
        stream = await open_stream(llm, ids, params, adapter, rid, constraint)
        # text-generation's chat() (model "tgi") parses TGI's chunks: a role and tool_calls
        # in every delta, and no [DONE] line (its parser would read it as JSON).
        tgi = adapter is None and body.model == TGI_MODEL_NAME
        return _openai_stream(
            stream,
            chunk_base,
            _include_usage(body),
            _chat_choice(llm, body, tgi=tgi),
            done=not tgi,
        )
    result = await llm.complete(ids, params, adapter=adapter, request_id=rid, constraint=constraint)
    if body.stream:  # tool calls: the answer is parsed whole, then streamed
        return _tool_stream(
            chunk_base,
            result,
            _include_usage(body),
            lambda i: _chat_logprobs(llm, result, i, body.logprobs),
        )
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
        logprobs = _chat_logprobs(llm, result, i, body.logprobs)
        choices.append(
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}
        )
    return {
        **base,
        "choices": choices,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def _response_base(
    llm: LLM, prefix: str, kind: str, asked: str, adapter: str | None
) -> dict[str, Any]:
    """What every response and chunk of one request carries: id, object, created, model,
    and OpenAI's ``system_fingerprint`` (this server's version and the model served;
    text-generation's chat() parser needs it)."""
    return {
        "id": new_request_id(prefix),
        "object": kind,
        "created": unix_time(),
        "model": served_name(llm, asked, adapter),
        "system_fingerprint": f"openllm-clone-{SERVER_VERSION}",
    }


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _chat_choice(
    llm: LLM, body: ChatCompletionRequest, *, tgi: bool = False
) -> Callable[[RequestOutput, SeqDelta], dict[str, Any]]:
    """A streamed chat delta as an OpenAI chunk choice (the role in each choice's first;
    ``tgi``: TGI's shape, the role and ``tool_calls`` in every delta)."""
    first: set[int] = set()

    def choice(out: RequestOutput, d: SeqDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": d.text} if d.text or d.finish_reason is None else {}
        if d.index not in first or tgi:
            first.add(d.index)
            delta = {"role": "assistant", "content": d.text}
            if tgi:
                delta["tool_calls"] = None
        logprobs = None
        if body.logprobs:
            logprobs = {
                "content": chat_logprobs(llm.token_strings, d.logprobs or []),
                "refusal": None,
            }
        return {
            "index": d.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": d.finish_reason,
        }

    return choice


def _chat_logprobs(llm: LLM, result: Any, i: int, asked: bool) -> dict[str, Any] | None:
    """Chat ``logprobs`` of a finished choice (None unless asked)."""
    if not asked or result.logprobs is None:
        return None
    return {"content": chat_logprobs(llm.token_strings, result.logprobs[i]), "refusal": None}


def _tool_stream(
    base: dict[str, Any],
    result: Any,
    include_usage: bool,
    logprobs_of: Callable[[int], dict[str, Any] | None],
) -> StreamingResponse:
    """Stream a finished tool-calling answer as OpenAI chunks (calls arrive whole; the first
    chunk of a choice carries all its logprobs, when asked)."""

    async def events() -> AsyncIterator[str]:
        for i, text in enumerate(result.texts):
            content, calls = parse_tool_output(text)
            yield sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {
                                "role": "assistant",
                                "content": content if not calls else None,
                            },
                            "logprobs": logprobs_of(i),
                            "finish_reason": None,
                        }
                    ],
                }
            )
            if calls:
                delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                yield sse(
                    {
                        **base,
                        "choices": [
                            {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
            yield sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": "tool_calls" if calls else result.finish_reasons[i],
                        }
                    ],
                }
            )
        if include_usage:
            yield sse(
                {
                    **base,
                    "choices": [],
                    "usage": usage(result.prompt_tokens, result.completion_tokens),
                }
            )
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def _completion_logprobs(
    llm: LLM,
    prompt_lp: list[Any] | None,
    prompt_ids: list[int],
    entries: list[Any] | None,
    offset: int,
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


async def _merge_streams(
    streams: list[AsyncIterator[RequestOutput]], n: int
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
    totals = [(0, 0)] * len(streams)
    live = len(streams)
    try:
        while live:
            p, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            totals[p] = (item.prompt_tokens, item.completion_tokens)
            deltas = [
                SeqDelta(p * n + d.index, d.text, d.token_ids, d.finish_reason, d.logprobs)
                for d in item.deltas
            ]
            yield RequestOutput(
                item.request_id,
                deltas,
                sum(u[0] for u in totals),
                sum(u[1] for u in totals),
                finished=live == 1 and item.finished,
                prompt_logprobs=item.prompt_logprobs,
            )
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
    *,
    done: bool = True,
) -> StreamingResponse:
    """The stream's chunks as SSE, then ``[DONE]`` (unless ``done`` is False)."""

    async def events() -> AsyncIterator[str]:
        last: RequestOutput | None = None
        try:
            async for out in stream:
                last = out
                if out.deltas:
                    yield sse(
                        {
                            **base,
                            "choices": [choice(out, d) for d in out.deltas],
                            **({"usage": None} if include_usage else {}),
                        }
                    )
        except OpenLLMCloneError as exc:
            yield sse(exc.to_dict())
        if include_usage and last is not None:
            yield sse(
                {**base, "choices": [], "usage": usage(last.prompt_tokens, last.completion_tokens)}
            )
        if done:
            yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
