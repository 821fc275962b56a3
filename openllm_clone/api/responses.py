"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

What the OpenAI SDK's ``responses.create`` and the OpenAI Agents SDK send: ``input`` (a
string or message items, function calls and their outputs), ``instructions``, sampling
fields, function ``tools`` with ``tool_choice``, ``text.format`` (JSON schema or object),
streaming with the SDK's event types, and ``previous_response_id`` over a bounded store.
A request runs as a chat completion does (the chat template, the tool grammar, the JSON
constraint); adapters are chosen by ``model``, under the same scopes and limits.

The store is in memory, per worker process (``MAX_STORED`` responses, the oldest dropped
first, each kept ``STORE_TTL_S``): a ``previous_response_id`` it no longer holds, or that
another worker of ``--workers N`` holds, is a 404.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field

from openllm_clone.errors import InvalidRequestError, NotFoundError, OpenLLMCloneError
from openllm_clone.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    NullMeansDefault,
    RequestOutput,
    new_request_id,
    unix_time,
)
from openllm_clone.tenants import cap_max_tokens
from openllm_clone.tools import parse_tool_output, plan_tools

from .common import json_body, llm_of, open_stream, parse_body, sampling, sse, with_system

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["MAX_STORED", "STORE_TTL_S", "ResponsesRequest", "routes"]

routes = APIRouter()

MAX_STORED = 1000  # responses kept per worker for previous_response_id
STORE_TTL_S = 3600.0


class ResponsesRequest(NullMeansDefault):
    """Body of ``POST /v1/responses`` (what this server serves of OpenAI's; other fields
    are refused by name rather than ignored)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model name or an adapter name.")
    input: str | list[dict[str, Any]] = Field(description="Text, or message and tool items.")
    instructions: str | None = Field(default=None, description="A system message (this turn).")
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    tools: list[dict[str, Any]] | None = Field(default=None, description="Function tools.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = Field(default=None, description="``format``: the output.")
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = Field(
        default=None, description="Only 'disabled': a prompt over the context is a 400."
    )
    include: list[str] | None = Field(
        default=None, description="Nothing extra can be included: only an empty list."
    )


@dataclass
class _Stored:
    """A response kept for ``previous_response_id``: the conversation so far (its input
    and output, not its instructions, which OpenAI does not carry over) and the body."""

    messages: list[ChatMessage]
    body: dict[str, Any]
    at: float


class ResponseStore:
    """A bounded, expiring map of response ids to conversations (this process's)."""

    def __init__(self, capacity: int = MAX_STORED, ttl: float = STORE_TTL_S) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, messages: list[ChatMessage], body: dict[str, Any]) -> None:
        """Keep a response (the oldest goes when full)."""
        with self._lock:
            self._items[rid] = _Stored(messages, body, time.monotonic())
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, rid: str) -> _Stored:
        """The stored response ``rid``, or a 404."""
        with self._lock:
            item = self._items.get(rid)
            if item is not None and time.monotonic() - item.at > self.ttl:
                del self._items[rid]
                item = None
        if item is None:
            raise NotFoundError(
                f"response {rid!r} is not stored here (expired, never stored, or held by "
                "another worker)",
                param="previous_response_id",
            )
        return item

    def delete(self, rid: str) -> None:
        """Forget ``rid`` (a 404 when it is not stored)."""
        self.get(rid)
        with self._lock:
            self._items.pop(rid, None)


STORE = ResponseStore()


def _text_of(content: Any, param: str) -> str:
    """An item's content as text: a string, or ``input_text`` / ``output_text`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("content must be a string or a list of parts", param=param)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise InvalidRequestError(
                f"only text content parts are served (not {kind!r})", param=param
            )
        texts.append(part["text"])
    return "".join(texts)


def _messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """``input`` as chat messages: function calls as the assistant's tool calls, their
    outputs as tool messages."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(items):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequestError(f"unknown message role {role!r}", param=param)
            messages.append(ChatMessage(role=role, content=_text_of(item.get("content"), param)))
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise InvalidRequestError(
                    "a function_call item needs a name and its arguments as a JSON string",
                    param=param,
                )
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            messages.append(ChatMessage.model_validate({"role": "assistant", "tool_calls": [call]}))
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, param)
            tool = {"role": "tool", "content": text, "tool_call_id": item.get("call_id")}
            messages.append(ChatMessage.model_validate(tool))
        else:
            raise InvalidRequestError(f"input items of type {kind!r} are not served", param=param)
    return messages


def _chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]], Any]:
    """Responses' flat function tools and tool_choice in chat's shape."""
    tools = []
    for tool in body.tools or []:
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"only function tools are served (not {tool.get('type')!r})", param="tools"
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        tools.append({"type": "function", "function": fn})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise InvalidRequestError("tool_choice names a function tool", param="tool_choice")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools, choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise InvalidRequestError("text.format must be an object", param="text")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    raise InvalidRequestError(f"unknown text.format type {fmt.get('type')!r}", param="text")


def _message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex[:24]}",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": "completed",
    }


def _output(text: str, tools: bool) -> tuple[list[dict[str, Any]], ChatMessage]:
    """The output items of a finished turn, and the turn as the assistant's message."""
    if not tools:
        return [_message_item(text)], ChatMessage(role="assistant", content=text)
    content, calls = parse_tool_output(text)
    items = [_call_item(c) for c in calls]
    if content is not None:
        items.insert(0, _message_item(content))
    if calls:
        return items, ChatMessage.model_validate({"role": "assistant", "tool_calls": calls})
    return items, ChatMessage(role="assistant", content=content or "")


class _Turn:
    """One request's prompt, parameters and the response object around its output."""

    def __init__(self, llm: LLM, body: ResponsesRequest) -> None:
        if body.include:
            raise InvalidRequestError("nothing extra can be included here", param="include")
        self.body = body
        self.adapter = llm.resolve_model_name(body.model)
        history = STORE.get(body.previous_response_id).messages if body.previous_response_id else []
        self.conversation = [*history, *_messages(body.input)]
        messages = list(self.conversation)
        if body.instructions:
            messages.insert(0, ChatMessage(role="system", content=body.instructions))
        tools, choice = _chat_tools(body)
        # The chat request validates the messages, sampling fields and response format the
        # way /v1/chat/completions does, and builds the tool plan from the same code.
        chat = parse_body(
            ChatCompletionRequest,
            {
                "model": body.model,
                "messages": [m.model_dump(exclude_none=True) for m in messages],
                "max_tokens": body.max_output_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "top_k": body.top_k,
                "seed": body.seed,
                "tools": tools or None,
                "tool_choice": choice,
                "response_format": _response_format(body.text),
            },
        )
        self.tool_plan = plan_tools(chat.tools or [], chat.tool_choice)
        if self.tool_plan is not None:
            chat.messages = with_system(chat.messages, self.tool_plan.system_prompt)
            self.constraint = llm.grammars.json_schema(self.tool_plan.schema)
        else:
            self.constraint = llm.constraint_for(chat.response_format)
        self.ids = llm.tokenize(llm.chat_prompt(chat.messages))
        default_max = max(1, llm.info.max_model_len - len(self.ids))
        self.params = sampling(lambda: chat.sampling_params(cap_max_tokens(min(default_max, 4096))))
        self.id = new_request_id("resp")
        self.created = unix_time()
        self.model = body.model or llm.name

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        tokens: tuple[int, int] = (0, 0),
        finish: str | None = None,
    ) -> dict[str, Any]:
        """The response object (OpenAI's fields)."""
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if status == "completed" and incomplete is not None:
            status = "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "text": body.text or {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": body.store,
            "metadata": body.metadata or {},
            "user": body.user,
            "usage": {
                "input_tokens": tokens[0],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": tokens[1],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": tokens[0] + tokens[1],
            },
        }

    def finish(self, text: str, tokens: tuple[int, int], finish: str | None) -> dict[str, Any]:
        """The completed response; kept in the store when ``store`` is on."""
        output, said = _output(text, self.tool_plan is not None)
        done = self.response("completed", output, tokens, finish)
        if self.body.store:
            STORE.put(self.id, [*self.conversation, said], done)
        return done


@routes.post("/responses")
async def create_response(request: Request) -> Any:
    llm = llm_of(request)
    body = parse_body(ResponsesRequest, await json_body(request))
    turn = _Turn(llm, body)
    if body.stream and turn.tool_plan is None:
        stream = await open_stream(
            llm, turn.ids, turn.params, turn.adapter, turn.id, turn.constraint
        )
        return StreamingResponse(_text_events(turn, stream), media_type="text/event-stream")
    result = await llm.complete(
        turn.ids, turn.params, adapter=turn.adapter, request_id=turn.id, constraint=turn.constraint
    )
    tokens = (result.prompt_tokens, result.completion_tokens)
    done = turn.finish(result.texts[0], tokens, result.finish_reasons[0])
    if not body.stream:
        return done
    return StreamingResponse(_whole_events(turn, done), media_type="text/event-stream")


@routes.get("/responses/{response_id}")
async def get_response(response_id: str) -> Any:
    return STORE.get(response_id).body


@routes.delete("/responses/{response_id}")
async def delete_response(response_id: str) -> Any:
    STORE.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


class _Events:
    """SSE events of one response, numbered as the SDK expects."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\n" + sse(event)


async def _text_events(turn: _Turn, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """A text answer streamed as its tokens come."""
    event = _Events()
    yield event("response.created", response=turn.response("in_progress", []))
    yield event("response.in_progress", response=turn.response("in_progress", []))
    item = _message_item("")
    item["status"], item["content"] = "in_progress", []
    where = {"item_id": item["id"], "output_index": 0}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", **where, content_index=0, part=part)
    text, tokens, finish = "", (0, 0), None
    try:
        async for out in stream:
            tokens = (out.prompt_tokens, out.completion_tokens)
            for delta in out.deltas:
                finish = delta.finish_reason or finish
                if delta.text:
                    text += delta.text
                    yield event(
                        "response.output_text.delta",
                        **where,
                        content_index=0,
                        delta=delta.text,
                        logprobs=[],
                    )
    except OpenLLMCloneError as exc:
        failed = turn.response("failed", [])
        failed["error"] = {"code": exc.error_type, "message": exc.message}
        yield event("response.failed", response=failed)
        return
    yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
    part = {**part, "text": text}
    yield event("response.content_part.done", **where, content_index=0, part=part)
    done = turn.finish(text, tokens, finish)
    final = done["output"][0]
    final["id"] = item["id"]
    yield event("response.output_item.done", output_index=0, item=final)
    yield event(_final_kind(done), response=done)


async def _whole_events(turn: _Turn, done: dict[str, Any]) -> AsyncIterator[str]:
    """A finished answer (tool calls: parsed whole) streamed as the SDK's events."""
    event = _Events()
    yield event("response.created", response=turn.response("in_progress", []))
    yield event("response.in_progress", response=turn.response("in_progress", []))
    for index, item in enumerate(done["output"]):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            yield event("response.function_call_arguments.delta", **where, delta=item["arguments"])
            yield event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        else:
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
            yield event("response.content_part.added", **where, content_index=0, part=part)
            yield event(
                "response.output_text.delta", **where, content_index=0, delta=text, logprobs=[]
            )
            yield event(
                "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
            )
            yield event(
                "response.content_part.done", **where, content_index=0, part={**part, "text": text}
            )
        yield event("response.output_item.done", output_index=index, item=item)
    yield event(_final_kind(done), response=done)


def _final_kind(done: dict[str, Any]) -> str:
    return "response.incomplete" if done["status"] == "incomplete" else "response.completed"
