"""Structured output and tool calls on SmolLM2 through the real server and real clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from openllm_clone.testing import Server, run_server

pytestmark = [pytest.mark.model, pytest.mark.slow]
pytest.importorskip("xgrammar")


class City(BaseModel):
    name: str
    country: str
    population_millions: float


CALLS: list[dict[str, Any]] = []


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    CALLS.append({"a": a, "b": b})
    return a * b


@pytest.fixture(scope="module")
def server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from openllm_clone.store import resolve_model

    resolve_model("smollm2")
    with run_server(["smollm2"], {}, tmp_path_factory.mktemp("logs") / "smol.log") as srv:
        yield srv


def test_json_schema_through_openai_sdk_always_parses(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    schema = City.model_json_schema()
    for seed in range(10):
        reply = client.chat.completions.create(
            model="smollm2",
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": schema},
            },
        )
        City.model_validate_json(reply.choices[0].message.content or "")
    plain = client.chat.completions.create(
        model="smollm2",
        max_tokens=60,
        messages=[{"role": "user", "content": "List two colours."}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)


def test_langchain_with_structured_output_twenty_sampled_runs(server: Server) -> None:
    from openllm_clone.integrations.langchain import ChatOpenLLMClone

    chat = ChatOpenLLMClone(endpoint=server.url, temperature=1.0, max_tokens=120)
    structured = chat.with_structured_output(City)
    results = structured.batch(["Describe Paris as a city record."] * 20)
    assert len(results) == 20 and all(isinstance(r, City) for r in results)


def test_tool_calls_come_back_as_openai_tool_calls(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "multiply",
                "description": "Multiply two integers.",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        }
    ]
    reply = client.chat.completions.create(
        model="smollm2",
        max_tokens=60,
        tools=tools,
        tool_choice="required",
        messages=[{"role": "user", "content": "What is 6 times 7?"}],
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "multiply"
    args = json.loads(call.function.arguments)
    assert isinstance(args["a"], int) and isinstance(args["b"], int)
    streamed = client.chat.completions.create(
        model="smollm2",
        max_tokens=60,
        tools=tools,
        tool_choice="required",
        stream=True,
        messages=[{"role": "user", "content": "What is 6 times 7?"}],
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert any(d.tool_calls for d in deltas)


def test_langchain_tool_calling_agent_runs_a_real_tool(server: Server) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from openllm_clone.integrations.langchain import ChatOpenLLMClone

    multiply_tool = tool(multiply)
    base = ChatOpenLLMClone(endpoint=server.url, max_tokens=80)
    # A minimal agent loop: the first turn must call a tool, later turns may answer.
    first, later = (
        base.bind_tools([multiply_tool], tool_choice="any"),
        base.bind_tools([multiply_tool]),
    )
    messages: list[Any] = [HumanMessage("Use the multiply tool: what is 6 times 7?")]
    CALLS.clear()
    answer = None
    for turn in range(4):
        reply = (first if turn == 0 else later).invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            answer = reply.content
            break
        for call in reply.tool_calls:
            result = multiply_tool.invoke(call["args"])
            messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
    assert CALLS and all(isinstance(c["a"], int) and isinstance(c["b"], int) for c in CALLS)
    assert answer is not None and "42" in str(answer)  # it used the tool's result


def test_smolagents_tool_calling_agent(server: Server) -> None:
    smolagents = pytest.importorskip("smolagents")

    @smolagents.tool
    def multiply_numbers(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        return multiply(a, b)

    from openllm_clone.integrations.agents import smolagents_model

    CALLS.clear()
    model = smolagents_model(server.url, max_tokens=120)
    assert model.model_id == "smollm2"
    agent = smolagents.ToolCallingAgent(
        tools=[multiply_numbers], model=model, max_steps=3, verbosity_level=0
    )
    agent.run("What is 6 times 7? Use the multiply_numbers tool.")
    assert CALLS and all(isinstance(c["a"], int) and isinstance(c["b"], int) for c in CALLS)
