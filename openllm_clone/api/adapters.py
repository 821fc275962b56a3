"""Adapter management: ``GET``/``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, and
the usage totals per tenant and adapter, ``GET /v1/usage``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from openllm_clone.protocol import LoadAdapterRequest

from .common import json_body, llm_of, parse_body

__all__ = ["routes"]


# List, load at run time, unload (after in-flight requests finish).
routes = APIRouter()


@routes.get("/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [a.model_dump() for a in llm_of(request).visible_adapters()]}


@routes.post("/adapters")
async def load_adapter(request: Request) -> JSONResponse:
    llm = llm_of(request)
    body = parse_body(LoadAdapterRequest, await json_body(request))
    record = await llm.adapters.add(body.name, body.source, pinned=body.pinned, force=body.force)
    return JSONResponse(record.info().model_dump(), status_code=200)


@routes.delete("/adapters/{name}")
async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
    await llm_of(request).adapters.delete(name)
    return {"name": name, "deleted": True}


@routes.get("/usage")
async def usage(request: Request) -> dict[str, Any]:
    """Requests and tokens per tenant and adapter since this process started (an
    admin key's route when keys exist)."""
    return llm_of(request).tenancy.meter.snapshot()
