"""OpenAI's Responses API through the official SDK and the OpenAI Agents SDK, against the
real server: plain, streamed, a function tool round trip over previous_response_id,
JSON-schema output, an adapter by model, and the Agents SDK's tool-calling turn."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.helpers import Server

pytestmark = pytest.mark.e2e

QUESTION = "What is the weather like in Paris?"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def server(shared_tiny_server: Server) -> Server:
    """This module only sends requests: the session's shared server serves it."""
    return shared_tiny_server


@pytest.fixture(scope="module")
def client(shared_openai_client: Any) -> Any:
    return shared_openai_client


def _chat_text(server: Server, messages: list[dict[str, str]], model: str = "", n: int = 8) -> str:
    body = {"model": model, "messages": messages, "max_tokens": n, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def test_plain_and_instructions_equal_chat(server: Server, client: Any) -> None:
    """Greedy output: the same text as the chat route for the same messages (instructions
    are the system message); usage and status as OpenAI's."""
    reply = client.responses.create(
        model="", input=QUESTION, max_output_tokens=8, temperature=0, store=False
    )
    assert reply.object == "response" and reply.status == "incomplete"  # cut at 8 tokens
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text == _chat_text(server, [{"role": "user", "content": QUESTION}])
    assert reply.usage.output_tokens == 8 and reply.usage.input_tokens > 0
    told = client.responses.create(
        model="",
        instructions="Answer in French.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        max_output_tokens=8,
        temperature=0,
    )
    system = [{"role": "system", "content": "Answer in French."}]
    assert told.output_text == _chat_text(server, [*system, {"role": "user", "content": QUESTION}])
    # An adapter by its name, as on the chat route.
    alpha = client.responses.create(
        model="alpha", input=QUESTION, max_output_tokens=8, temperature=0
    )
    assert alpha.model == "alpha"
    assert alpha.output_text == _chat_text(
        server, [{"role": "user", "content": QUESTION}], model="alpha"
    )
    assert alpha.output_text != reply.output_text


def test_streamed_events_carry_the_same_text(client: Any) -> None:
    whole = client.responses.create(model="", input=QUESTION, max_output_tokens=10, temperature=0)
    kinds, deltas, final = [], [], None
    with client.responses.create(
        model="", input=QUESTION, max_output_tokens=10, temperature=0, stream=True
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert "".join(deltas) == whole.output_text == final.output_text


def test_function_tool_round_trip_over_previous_response_id(client: Any) -> None:
    """The model must call the tool (tool_choice required): a function_call item with JSON
    arguments; its output sent back with previous_response_id gets a text answer; the
    conversation is the stored one (GET gives it back; an unknown id is a 404)."""
    import openai

    first = client.responses.create(
        model="",
        input=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    second = client.responses.create(
        model="",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert second.output[0].type == "message" and second.output_text
    assert client.responses.retrieve(second.id).output_text == second.output_text
    # The same turn without the history is another prompt: previous_response_id was used.
    alone = client.responses.create(
        model="",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        max_output_tokens=8,
        temperature=0,
    )
    assert alone.output_text != second.output_text
    # Streamed, the call comes as the SDK's function-call events.
    with client.responses.create(
        model="",
        input=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
        stream=True,
    ) as stream:
        events = list(stream)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == json.loads(call.arguments)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="", input="hi", previous_response_id="resp_nope")


def test_json_schema_output_and_refusals(server: Server, client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    reply = client.responses.create(
        model="",
        input=QUESTION,
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema}},
        max_output_tokens=64,
        temperature=0,
    )
    data = json.loads(reply.output_text)
    assert set(data) == {"city", "rain"} and isinstance(data["rain"], bool)
    # What this server does not do is refused by name, not ignored.
    for extra, field in [
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
    ]:
        body = {"model": "", "input": "hi", **extra}
        r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
        assert r.status_code == 400 and field in json.dumps(r.json()), r.text


def test_agents_sdk_runs_a_tool_calling_turn(server: Server) -> None:
    """The OpenAI Agents SDK's own loop over /v1/responses: the agent must call its tool
    (tool_choice required) and the run stops on the tool's result."""
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # traces would go to api.openai.com
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"sunny in {city}"

    async def run() -> Any:
        openai_client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        agent = Agent(
            name="weather",
            instructions="Use the tool to answer.",
            model=OpenAIResponsesModel(model="", openai_client=openai_client),
            model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
            tools=[get_weather],
            tool_use_behavior="stop_on_first_tool",
        )
        try:
            return await Runner.run(agent, QUESTION, max_turns=2)
        finally:
            await openai_client.close()

    result = asyncio.run(run())
    assert len(cities) == 1 and result.final_output == f"sunny in {cities[0]}"
