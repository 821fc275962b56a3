"""LangChain models over openllm-clone: ``OpenLLMClone`` (an LLM) and ``ChatOpenLLMClone``.

Both talk to a server through :mod:`openllm_clone.client` (sync and async, streaming,
the adapter passed through on every call), or, with ``embedded=True``, run the model
in-process without a server (as OpenLLM's ``embedded`` mode did)::

    from openllm_clone.integrations.langchain import ChatOpenLLMClone

    chat = ChatOpenLLMClone(endpoint="http://127.0.0.1:3000", adapter_name="legal")
    chat.invoke("What is a tort?")

Needs the ``langchain`` extra (``langchain-core``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from openllm_clone.errors import MissingDependencyError

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import LangSmithParams
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        GenerationChunk,
    )
    from langchain_core.runnables import Runnable
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError.for_extra("langchain-core", "langchain") from exc

__all__ = ["ChatOpenLLMClone", "OpenLLMClone"]


class _Embedded:
    """An in-process LLM with its own event loop thread, shared by sync and async calls."""

    def __init__(self, settings: Any) -> None:
        from openllm_clone.llm import LLM as Engine

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="openllm-clone-embedded", daemon=True
        )
        self.thread.start()
        self.llm = Engine.from_settings(settings)
        self.run(self.llm.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def arun(self, coro: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stream(self, prompt: str, params: Any, adapter: str | None) -> Iterator[str]:
        import queue

        out: queue.Queue[Any] = queue.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for event in self.llm.stream(
                    self.llm.tokenize(prompt), params, adapter=adapter
                ):
                    for delta in event.deltas:
                        if delta.text:
                            out.put(delta.text)
            except Exception as exc:  # hand the error to the consumer
                out.put(exc)
            finally:
                out.put(done)

        asyncio.run_coroutine_threadsafe(pump(), self.loop)
        while (item := out.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item


class OpenLLMClone(LLM):
    """A LangChain LLM (text in, text out) backed by an openllm-clone server or engine."""

    # Unset: the HTTP client reads OPENLLM_CLONE_ENDPOINT / OPENLLM_CLONE_API_KEY (the one
    # place outside Settings that reads the environment).
    endpoint: str | None = Field(
        default=None, description="Server URL (or OPENLLM_CLONE_ENDPOINT)."
    )
    api_key: str | None = Field(default=None, description="Bearer key (or OPENLLM_CLONE_API_KEY).")
    adapter_name: str | None = Field(default=None, description="Adapter for every call.")
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float = 600.0
    embedded: bool = Field(default=False, description="Run the model in-process, no server.")
    model: str = Field(default="smollm2", description="Model for embedded mode.")
    embedded_options: dict[str, Any] = Field(
        default_factory=dict, description="More Settings fields for embedded mode."
    )
    _engine: _Embedded | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "openllm-clone"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "adapter_name": self.adapter_name,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "embedded": self.embedded,
            "model": self.model if self.embedded else None,
        }

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        params = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stop or self.stop,
        }
        params.update(
            {
                k: v
                for k, v in kwargs.items()
                if k
                in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty")
            }
        )
        return {k: v for k, v in params.items() if v is not None}

    def _adapter(self, kwargs: dict[str, Any]) -> str | None:
        return kwargs.get("adapter_name", self.adapter_name)

    def _embedded_engine(self) -> _Embedded:
        if self._engine is None:
            from openllm_clone.settings import Settings

            self._engine = _Embedded(Settings(model=self.model, **self.embedded_options))
        return self._engine

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        params = self._params(stop, kwargs)
        adapter = self._adapter(kwargs)
        if self.embedded:
            from openllm_clone.protocol import SamplingParams

            pieces: Iterator[str] = self._embedded_engine().stream(
                prompt, SamplingParams(**params), adapter
            )
        else:
            from openllm_clone.client import HTTPClient

            pieces = self._http_pieces(
                HTTPClient(self.endpoint, api_key=self.api_key, timeout=self.timeout),
                prompt,
                adapter,
                params,
            )
        for text in pieces:
            chunk = GenerationChunk(text=text)
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk

    @staticmethod
    def _http_pieces(
        client: Any, prompt: str, adapter: str | None, params: dict[str, Any]
    ) -> Iterator[str]:
        with client:
            for event in client.generate_stream(prompt, adapter_name=adapter, **params):
                for output in event.outputs:
                    if output.text:
                        yield output.text

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        parts = [chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)]
        return "".join(parts)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        if self.embedded:
            # The embedded engine lives on its own loop: bridge through a thread.
            for chunk in await asyncio.to_thread(
                lambda: list(self._stream(prompt, stop, None, **kwargs))
            ):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
            return
        from openllm_clone.client import AsyncHTTPClient

        params = self._params(stop, kwargs)
        async with AsyncHTTPClient(
            self.endpoint, api_key=self.api_key, timeout=self.timeout
        ) as client:
            async for event in client.generate_stream(
                prompt, adapter_name=self._adapter(kwargs), **params
            ):
                for output in event.outputs:
                    if not output.text:
                        continue
                    chunk = GenerationChunk(text=output.text)
                    if run_manager:
                        await run_manager.on_llm_new_token(output.text, chunk=chunk)
                    yield chunk


def _role(message: BaseMessage) -> dict[str, Any]:
    if isinstance(message, AIMessage) and message.tool_calls:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c.get("id") or "call",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["args"])},
                }
                for c in message.tool_calls
            ],
        }
    if isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, ChatMessage):
        role = message.role
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    content = (
        message.content
        if isinstance(message.content, str)
        else "".join(p if isinstance(p, str) else p.get("text", "") for p in message.content)
    )
    return {"role": role, "content": content}


def _usage(usage: dict[str, int] | None) -> UsageMetadata | None:
    if not usage:
        return None
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
    )


class ChatOpenLLMClone(BaseChatModel):
    """A LangChain chat model over the server's OpenAI-compatible chat route.

    ``model`` (alias ``model_name``) is the OpenAI ``model``: the base model's name or an
    adapter's; ``adapter_name`` is the older spelling of the same. A per-call ``model=``
    (or ``adapter_name=``) overrides it; unset means the base model.
    """

    model_config = ConfigDict(populate_by_name=True)

    # Unset: the HTTP client reads OPENLLM_CLONE_ENDPOINT / OPENLLM_CLONE_API_KEY (the one
    # place outside Settings that reads the environment).
    endpoint: str | None = Field(
        default=None, description="Server URL (or OPENLLM_CLONE_ENDPOINT)."
    )
    api_key: str | None = Field(default=None, description="Bearer key (or OPENLLM_CLONE_API_KEY).")
    model: str | None = Field(
        default=None,
        alias="model_name",
        description="Base model or adapter name (the OpenAI `model`).",
    )
    adapter_name: str | None = Field(default=None, description="Adapter (same as `model`).")
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float = 600.0

    @property
    def _llm_type(self) -> str:
        return "openllm-clone-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "model": self.model or self.adapter_name,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _model_for(self, kwargs: dict[str, Any]) -> str | None:
        """The call's ``model`` (or ``adapter_name``), else the instance's."""
        return kwargs.get("model") or kwargs.get("adapter_name") or self.model or self.adapter_name

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="openllm_clone",
            ls_model_type="chat",
            ls_model_name=self._model_for(kwargs) or "default",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        stops = stop or kwargs.get("stop") or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    def bind_tools(  # type: ignore[override]
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Runnable[Any, BaseMessage]:
        """Offer tools to the model; the server constrains its output to valid calls."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice in ("any", True):
            tool_choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def _body(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[str | None, list[dict[str, Any]], dict[str, Any]]:
        params = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stop or self.stop,
        }
        params.update(
            {
                k: v
                for k, v in kwargs.items()
                if k
                in (
                    "max_tokens",
                    "temperature",
                    "top_p",
                    "seed",
                    "response_format",
                    "tools",
                    "tool_choice",
                    "logprobs",
                    "top_logprobs",
                )
            }
        )
        return (
            self._model_for(kwargs),
            [_role(m) for m in messages],
            {k: v for k, v in params.items() if v is not None},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from openllm_clone.client import HTTPClient

        model, msgs, params = self._body(messages, stop, kwargs)
        with HTTPClient(self.endpoint, api_key=self.api_key, timeout=self.timeout) as client:
            reply = client.chat(msgs, model=model, **params)
        return self._result(reply)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        from openllm_clone.client import AsyncHTTPClient

        model, msgs, params = self._body(messages, stop, kwargs)
        async with AsyncHTTPClient(
            self.endpoint, api_key=self.api_key, timeout=self.timeout
        ) as client:
            reply = await client.chat(msgs, model=model, **params)
        return self._result(reply)

    @staticmethod
    def _result(reply: dict[str, Any]) -> ChatResult:
        choice = reply["choices"][0]
        calls = [
            {
                "name": c["function"]["name"],
                "args": json.loads(c["function"]["arguments"]),
                "id": c["id"],
                "type": "tool_call",
            }
            for c in choice["message"].get("tool_calls") or []
        ]
        metadata: dict[str, Any] = {
            "finish_reason": choice.get("finish_reason"),
            "model_name": reply.get("model"),
            "model_provider": "openllm_clone",
        }
        if choice.get("logprobs"):
            metadata["logprobs"] = choice["logprobs"]
        message = AIMessage(
            content=choice["message"]["content"] or "",
            tool_calls=calls,
            usage_metadata=_usage(reply.get("usage")),
            response_metadata=metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        from openllm_clone.client import HTTPClient

        model, msgs, params = self._body(messages, stop, kwargs)
        with HTTPClient(self.endpoint, api_key=self.api_key, timeout=self.timeout) as client:
            for event in client.chat_stream(
                msgs, model=model, stream_options={"include_usage": True}, **params
            ):
                chunk = self._chunk(event)
                if chunk is None:
                    continue
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        from openllm_clone.client import AsyncHTTPClient

        model, msgs, params = self._body(messages, stop, kwargs)
        async with AsyncHTTPClient(
            self.endpoint, api_key=self.api_key, timeout=self.timeout
        ) as client:
            async for event in client.chat_stream(
                msgs, model=model, stream_options={"include_usage": True}, **params
            ):
                chunk = self._chunk(event)
                if chunk is None:
                    continue
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    @staticmethod
    def _chunk(event: dict[str, Any]) -> ChatGenerationChunk | None:
        if event.get("usage") and not event.get("choices"):
            return ChatGenerationChunk(
                message=AIMessageChunk(content="", usage_metadata=_usage(event["usage"]))
            )
        choices = event.get("choices") or []
        if not choices:
            return None
        delta = choices[0].get("delta") or {}
        reason = choices[0].get("finish_reason")
        info = {"finish_reason": reason} if reason else None
        # Chunk metadata is merged by concatenating strings: the model's name goes on the
        # last chunk only, as ChatOpenAI does.
        metadata: dict[str, Any] = (
            {
                "finish_reason": reason,
                "model_name": event.get("model"),
                "model_provider": "openllm_clone",
            }
            if reason
            else {}
        )
        if choices[0].get("logprobs"):
            metadata["logprobs"] = choices[0]["logprobs"]
        tool_chunks = [
            tool_call_chunk(
                name=c["function"]["name"],
                args=c["function"]["arguments"],
                id=c.get("id"),
                index=c.get("index", 0),
            )
            for c in delta.get("tool_calls") or []
        ]
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=delta.get("content") or "",
                tool_call_chunks=tool_chunks,
                response_metadata=metadata,
            ),
            generation_info=info,
        )
