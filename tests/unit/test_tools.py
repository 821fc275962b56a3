"""Tool calls without a model: the plan (schema, prompt) for each ``tool_choice``, the
refusals, and reading the constrained output back (``openllm_clone.tools``)."""

from __future__ import annotations

import json

import pytest

from openllm_clone.errors import InvalidRequestError
from openllm_clone.tools import parse_tool_output, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "time"}}


def test_auto_allows_an_answer_beside_every_tool() -> None:
    plan = plan_tools([WEATHER, TIME], "auto")
    assert plan is not None and plan.allow_answer
    options = plan.schema["anyOf"]
    assert [o["properties"].get("name", {}).get("const") for o in options] == [
        "weather",
        "time",
        None,
    ]
    assert options[0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert options[1]["properties"]["arguments"] == {"type": "object"}  # no parameters given
    assert options[2]["required"] == ["answer"]
    assert "- weather: The weather in a city." in plan.system_prompt
    assert '{"answer": "<your answer>"}' in plan.system_prompt


def test_required_and_a_named_function_narrow_the_choice() -> None:
    required = plan_tools([WEATHER, TIME], "required")
    assert required is not None and not required.allow_answer
    assert len(required.schema["anyOf"]) == 2 and "answer" not in required.system_prompt
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "time"}})
    assert named is not None and not named.allow_answer
    assert named.schema["properties"]["name"] == {"const": "time"}  # one option: no anyOf
    assert plan_tools([WEATHER], "none") is None and plan_tools([], "auto") is None


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([{"type": "retrieval"}], "auto", "tools"),
        ([{"type": "function", "function": {"description": "no name"}}], "auto", "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
    ],
)
def test_bad_tools_and_choices_name_the_field(tools: list, choice: object, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(tools, choice)
    assert info.value.param == param


def test_output_is_read_back_as_a_call_an_answer_or_text() -> None:
    content, calls = parse_tool_output('{"name": "weather", "arguments": {"city": "Paris"}}')
    assert content is None and len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert parse_tool_output('{"answer": "Sunny"}') == ("Sunny", [])
    assert parse_tool_output('{"name": "time"') == ('{"name": "time"', [])  # cut short
    assert parse_tool_output("[1, 2]") == ("[1, 2]", [])
