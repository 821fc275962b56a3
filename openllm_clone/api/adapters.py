"""Adapter management: ``GET``/``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, and
the usage totals per tenant and adapter, ``GET /v1/usage``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from openllm_clone.protocol import LoadAdapterRequest

from .common import json_body, parse_body

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["router"]


def router(get_llm: Callable[[], LLM]) -> APIRouter:
    """List, load at run time, unload (after in-flight requests finish)."""
    routes = APIRouter()

    @routes.get("/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"object": "list", "data": [a.model_dump() for a in get_llm().visible_adapters()]}

    @routes.post("/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        llm = get_llm()
        body = parse_body(LoadAdapterRequest, await json_body(request))
        record = await llm.adapters.add(
            body.name, body.source, pinned=body.pinned, force=body.force
        )
        return JSONResponse(record.info().model_dump(), status_code=200)

    @routes.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await get_llm().adapters.delete(name)
        return {"name": name, "deleted": True}

    @routes.get("/usage")
    async def usage() -> dict[str, Any]:
        """Requests and tokens per tenant and adapter since this process started (an
        admin key's route when keys exist)."""
        return get_llm().tenancy.meter.snapshot()

    return routes
