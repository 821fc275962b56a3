"""Agents over openllm-clone: a smolagents model pointed at the server.

smolagents' own ``OpenAIServerModel`` speaks to the OpenAI-compatible routes, and the
server constrains tool calls so that even small models produce valid ones; this helper
only fills in the address, key and adapter::

    from smolagents import ToolCallingAgent
    from openllm_clone.integrations.agents import smolagents_model

    agent = ToolCallingAgent(tools=[my_tool], model=smolagents_model("http://127.0.0.1:3000"))
    agent.run("What is 6 times 7?")

Needs the ``agents`` extra (``smolagents``).
"""

from __future__ import annotations

import os
from typing import Any

from openllm_clone.errors import MissingDependencyError

__all__ = ["smolagents_model"]


def smolagents_model(
    endpoint: str | None = None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Any:
    """An ``OpenAIServerModel`` for the server at ``endpoint``.

    ``model`` is an adapter name, or the base model's name (default: the server's base
    model, read from ``/v1/models``).
    """
    try:
        from smolagents import OpenAIServerModel
    except ImportError as exc:
        raise MissingDependencyError.for_extra("smolagents", "agents") from exc
    from openllm_clone.client import HTTPClient

    base = (endpoint or os.environ.get("OPENLLM_CLONE_ENDPOINT") or "http://127.0.0.1:3000").rstrip(
        "/"
    )
    key = api_key if api_key is not None else os.environ.get("OPENLLM_CLONE_API_KEY") or "unused"
    if model is None:
        with HTTPClient(base, api_key=key) as client:
            model = client.models()[0]
    return OpenAIServerModel(model_id=model, api_base=f"{base}/v1", api_key=key, **kwargs)
