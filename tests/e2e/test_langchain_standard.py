"""LangChain's own standard suites (langchain-tests) for ``ChatOpenLLMClone``: the unit
suite, and the integration suite against a real server on the tiny random model.

Capabilities are declared as they are: tool calling and structured output (the server
constrains the output to the schema, so even a random model answers in shape), usage
metadata, model override (an adapter's name); no images, audio, PDFs or JSON mode through
``with_structured_output``. A case that fails because the random model cannot answer
sensibly is marked xfail with that reason; protocol failures are not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402
from openllm_clone.integrations.langchain import ChatOpenLLMClone  # noqa: E402

from tests.helpers import Server  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


_SERVER: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _endpoint(tiny_server: Server) -> Iterator[None]:
    _SERVER["url"] = tiny_server.url
    yield
    _SERVER.clear()


# Cases that ask what a random 2-layer model cannot do: pick the right argument value,
# choose a tool on its own under tool_choice="auto", copy Chinese text into an argument.
# The calls themselves (shape, streaming, parsing) are checked by the cases that pass.
_MODEL_QUALITY = {
    "test_tool_calling": "the random model fills the constrained call with a wrong value "
    "(e.g. {'input': 666} for 3)",
    "test_tool_calling_async": "as test_tool_calling: a wrong argument value",
    "test_agent_loop": "under tool_choice='auto' the random model answers in text instead of "
    "calling the tool",
    "test_unicode_tool_call_integration": "the random model does not copy the Chinese text "
    "into the call",
}


@pytest.fixture(autouse=True)
def _model_quality_xfail(request: pytest.FixtureRequest) -> None:
    reason = _MODEL_QUALITY.get(getattr(request.node, "originalname", ""))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=f"model quality: {reason}", strict=False))


class TestChatOpenLLMCloneUnit(ChatModelUnitTests):
    # No init_from_env_params: the model's endpoint stays unset and the HTTP client reads
    # OPENLLM_CLONE_ENDPOINT itself (the one reader outside Settings), so that case skips.
    @property
    def chat_model_class(self) -> type[ChatOpenLLMClone]:
        return ChatOpenLLMClone

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"endpoint": "http://127.0.0.1:9", "model": "tiny-llama", "temperature": 0.0}


class TestChatOpenLLMCloneIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenLLMClone]:
        return ChatOpenLLMClone

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {
            "endpoint": _SERVER["url"],
            "model": "tiny-llama",
            "temperature": 0.0,
            "max_tokens": 64,
        }

    @property
    def model_override_value(self) -> str:
        return "alpha"  # an adapter the server holds

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
