"""HTTP routes (FastAPI), one module per API family, over the process's LLM.

- :mod:`.openai` (OpenAI-compatible), :mod:`.openllm` (OpenLLM 0.4) and :mod:`.adapters`
  (adapter management) make the app mounted under ``/v1`` (:func:`build_app`);
- :mod:`.tgi` (TGI / LoRAX) and :mod:`.tokenizer` (vLLM's tokenizer routes) the app at the
  root (:func:`build_root_app`), which BentoML mounts passively: only its own paths reach it.

The routes know the :class:`~openllm_clone.llm.LLM` and nothing of tensors; this package
imports no torch. Every error is a JSON body with the status its exception carries (TGI's
shape on TGI's routes); bad input is a 4xx and never reaches the engine. Authentication
and body limits live in :mod:`openllm_clone.middleware`, around the whole server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from openllm_clone.errors import MethodNotAllowedError, NotFoundError, OpenLLMCloneError
from openllm_clone.protocol import (
    SERVER_VERSION,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    LoadAdapterRequest,
)

from . import adapters, embeddings, openai, openllm, responses, tgi, tokenizer
from .common import error_response, json_body, parse_body, sse, validation_error

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = [
    "build_app",
    "build_root_app",
    "error_response",
    "json_body",
    "parse_body",
    "sse",
    "validation_error",
]

logger = logging.getLogger("openllm_clone.access")


def _install_handlers(
    app: FastAPI, respond: Callable[[Request, OpenLLMCloneError], JSONResponse]
) -> None:
    """Every error as JSON: typed errors, validation, unknown routes and methods, bugs."""

    @app.exception_handler(OpenLLMCloneError)
    async def _on_error(request: Request, exc: OpenLLMCloneError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return respond(request, NotFoundError(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            response = respond(
                request,
                MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}"),
            )
            if exc.headers and "allow" in {k.lower() for k in exc.headers}:
                response.headers.update(exc.headers)
            return response
        error = OpenLLMCloneError(str(exc.detail))
        error.status_code = exc.status_code
        return respond(request, error)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return respond(request, OpenLLMCloneError(f"internal error: {type(exc).__name__}"))

    @app.middleware("http")
    async def _access_log(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        logger.info(
            "%s %s %d %.1fms",
            request.method,
            request.url.path,
            response.status_code,
            1000 * (time.perf_counter() - started),
        )
        return response


def build_app(get_llm: Callable[[], LLM]) -> FastAPI:
    """The FastAPI app for ``/v1``; ``get_llm`` returns the process's LLM."""
    app = FastAPI(title="openllm-clone", version=SERVER_VERSION, servers=[{"url": "/v1"}])
    app.state.get_llm = get_llm  # the routes read it: api.common.llm_of
    _install_handlers(app, lambda _, exc: error_response(exc))
    for family in (openllm, openai, responses, embeddings, adapters):
        app.include_router(family.routes)
    _document_bodies(app)
    return app


def build_root_app(get_llm: Callable[[], LLM]) -> FastAPI:
    """The FastAPI app served at the root: TGI / LoRAX and tokenizer routes."""
    app = FastAPI(
        title="openllm-clone (TGI/LoRAX and tokenizer routes)",
        version=SERVER_VERSION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def respond(request: Request, exc: OpenLLMCloneError) -> JSONResponse:
        if request.url.path in tgi.PATHS:
            return tgi.error_response(exc)
        return error_response(exc)

    app.state.get_llm = get_llm
    _install_handlers(app, respond)
    app.include_router(tgi.routes)
    app.include_router(tokenizer.routes)
    app.include_router(embeddings.root_routes)
    return app


# The routes parse their bodies themselves (so that every error is our JSON 400), which
# hides the bodies from FastAPI's OpenAPI: describe them explicitly for clients and fuzzers.
_BODIES: dict[str, type[BaseModel]] = {
    "/generate": GenerateRequest,
    "/generate_stream": GenerateRequest,
    "/completions": CompletionRequest,
    "/chat/completions": ChatCompletionRequest,
    "/responses": responses.ResponsesRequest,
    "/embeddings": embeddings.EmbeddingRequest,
    "/adapters": LoadAdapterRequest,
}


def _document_bodies(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, servers=app.servers
            )
            models: list[type[BaseModel]] = sorted(set(_BODIES.values()), key=lambda m: m.__name__)
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            for path, model in _BODIES.items():
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                        }
                    },
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
