"""Real LangChain against a real server (and the embedded engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate  # noqa: E402
from openllm_clone.integrations.langchain import ChatOpenLLMClone, OpenLLMClone  # noqa: E402

from openllm_clone.client import HTTPClient  # noqa: E402

pytestmark = pytest.mark.e2e


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


def test_llm_invoke_stream_batch_with_and_without_adapter(tiny_server: Server) -> None:
    llm = OpenLLMClone(endpoint=tiny_server.url, max_new_tokens=10)
    with HTTPClient(tiny_server.url) as client:
        want = client.generate("Once upon a time", max_new_tokens=10).outputs[0].text
        want_alpha = (
            client.generate("Once upon a time", max_new_tokens=10, adapter_name="alpha")
            .outputs[0]
            .text
        )
    assert llm.invoke("Once upon a time") == want
    handler = Tokens()
    streamed = list(llm.stream("Once upon a time", config={"callbacks": [handler]}))
    assert "".join(streamed) == want and "".join(handler.tokens) == want
    assert llm.invoke("Once upon a time", adapter_name="alpha") == want_alpha
    assert (
        OpenLLMClone(endpoint=tiny_server.url, max_new_tokens=10, adapter_name="alpha").invoke(
            "Once upon a time"
        )
        == want_alpha
    )
    assert llm.batch(["Once upon a time", "Once upon a time"]) == [want, want]


async def test_llm_ainvoke_and_astream(tiny_server: Server) -> None:
    llm = OpenLLMClone(endpoint=tiny_server.url, max_new_tokens=8, adapter_name="beta")
    text = await llm.ainvoke("Hello")
    chunks = [c async for c in llm.astream("Hello")]
    assert text and "".join(chunks) == text


def test_chat_model_invoke_stream_usage_and_chain(tiny_server: Server) -> None:
    chat = ChatOpenLLMClone(endpoint=tiny_server.url, max_tokens=8)
    reply = chat.invoke("Say something")
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] >= 1
    chunks = list(chat.stream("Say something"))
    assert "".join(c.content for c in chunks) == reply.content
    assert any(c.usage_metadata for c in chunks)
    adapted = chat.invoke("Say something", adapter_name="alpha")
    assert adapted.content != reply.content
    chain = (
        ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{q}")])
        | chat
        | StrOutputParser()
    )
    assert isinstance(chain.invoke({"q": "Hi"}), str)
    text_chain = (
        PromptTemplate.from_template("Q: {q}\nA:")
        | OpenLLMClone(endpoint=tiny_server.url, max_new_tokens=5)
        | StrOutputParser()
    )
    assert isinstance(text_chain.invoke({"q": "2+2?"}), str)


async def test_chat_model_ainvoke(tiny_server: Server) -> None:
    chat = ChatOpenLLMClone(endpoint=tiny_server.url, max_tokens=6, adapter_name="beta")
    reply = await chat.ainvoke("Hi")
    chunks = [c async for c in chat.astream("Hi")]
    assert "".join(c.content for c in chunks) == reply.content


def test_embedded_mode_needs_no_server(tiny_model_dir: Path) -> None:
    llm = OpenLLMClone(
        embedded=True,
        model=str(tiny_model_dir),
        max_new_tokens=6,
        embedded_options={"dtype": "float32", "kv_cache_mb": 16},
    )
    text = llm.invoke("Once upon a time")
    assert text == "".join(llm.stream("Once upon a time"))
