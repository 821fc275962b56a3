"""Tool calls: how a request with ``tools`` is prompted, constrained and read back.

Tool calls are decoded as JSON that must match one of the tools::

    {"name": "<tool name>", "arguments": {...the tool's parameter schema...}}

and, when ``tool_choice`` is ``auto``, also ``{"answer": "..."}`` for a plain reply.
The tools and this protocol are described to the model in a system message, so small
models that were never trained on a tool format still produce valid calls. The schema
becomes a grammar in :mod:`openllm_clone.structured`; this module imports neither
torch nor xgrammar (the routes import it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from openllm_clone.errors import InvalidRequestError

__all__ = ["ToolPlan", "parse_tool_output", "plan_tools"]


@dataclass
class ToolPlan:
    """How a request with tools is prompted and constrained."""

    schema: dict[str, Any]
    system_prompt: str
    allow_answer: bool


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type", "function") != "function" or "function" not in tool:
        raise InvalidRequestError("only function tools are supported", param="tools")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError("every tool needs a function name", param="tools")
    return fn


def plan_tools(tools: list[dict[str, Any]], tool_choice: Any) -> ToolPlan | None:
    """The grammar and system prompt for ``tools`` under ``tool_choice``; None for 'none'."""
    if not tools or tool_choice == "none":
        return None
    functions = [_function(t) for t in tools]
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == wanted]
        if not functions:
            raise InvalidRequestError(
                f"tool_choice names unknown function {wanted!r}", param="tool_choice"
            )
    elif tool_choice not in (None, "auto", "required"):
        raise InvalidRequestError(
            "tool_choice must be none, auto, required or a function", param="tool_choice"
        )
    allow_answer = tool_choice in (None, "auto")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    if allow_answer:
        options.append(
            {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    listing = "\n".join(
        f"- {f['name']}: {f.get('description', '').strip()} Arguments (JSON schema): "
        f"{json.dumps(f.get('parameters') or {})}"
        for f in functions
    )
    how = 'To call a tool, reply with JSON {"name": <tool name>, "arguments": {...}}.' + (
        ' To answer directly, reply with JSON {"answer": "<your answer>"}. After a tool '
        "result arrives, answer with it."
        if allow_answer
        else ""
    )
    return ToolPlan(
        schema=schema,
        system_prompt=f"You can use these tools:\n{listing}\n{how}",
        allow_answer=allow_answer,
    )


def parse_tool_output(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split constrained output into (content, OpenAI ``tool_calls``)."""
    try:
        data = json.loads(text)
    except ValueError:
        return text, []  # cut short (length): hand back the raw text
    if isinstance(data, dict) and "answer" in data and "name" not in data:
        return str(data["answer"]), []
    if isinstance(data, dict) and "name" in data:
        return None, [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": data["name"],
                    "arguments": json.dumps(data.get("arguments", {})),
                },
            }
        ]
    return text, []
