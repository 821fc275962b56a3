"""OpenLLM 0.4's routes: ``POST /v1/generate``, ``/v1/generate_stream``, ``/v1/metadata``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.protocol import (
    CompletionOutput,
    FinishReason,
    GenerateRequest,
    GenerateResponse,
    SamplingParams,
)

from .common import adapter_for, json_body, llm_of, open_stream, parse_body, sampling, sse, usage

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["routes"]


async def _request(
    llm: LLM, request: Request
) -> tuple[GenerateRequest, SamplingParams, str | None, list[int]]:
    """Body, sampling parameters, adapter and prompt tokens of a request."""
    body = parse_body(GenerateRequest, await json_body(request))
    params = sampling(body.sampling_params)
    adapter = await adapter_for(llm, body.adapter_name, body.merged_adapters)
    return body, params, adapter, llm.tokenize(body.prompt)


def _finish_reason(reason: str | None) -> FinishReason | None:
    """The engine's finish reason, typed as the schema's (the engine only makes those)."""
    return cast("FinishReason | None", reason)


# The OpenLLM routes over the process's LLM.
routes = APIRouter()


@routes.post("/generate")
async def generate(request: Request) -> JSONResponse:
    llm = llm_of(request)
    body, params, adapter, ids = await _request(llm, request)
    result = await llm.complete(ids, params, adapter=adapter)
    response = GenerateResponse(
        request_id=result.request_id,
        prompt=body.prompt,
        adapter_name=adapter,
        finished=True,
        outputs=[
            CompletionOutput(
                index=i,
                text=t,
                token_ids=result.token_ids[i],
                finish_reason=_finish_reason(result.finish_reasons[i]),
            )
            for i, t in enumerate(result.texts)
        ],
        prompt_token_ids=ids,
        usage=usage(result.prompt_tokens, result.completion_tokens),
    )
    return JSONResponse(response.model_dump())


@routes.post("/generate_stream")
async def generate_stream(request: Request) -> StreamingResponse:
    llm = llm_of(request)
    _, params, adapter, ids = await _request(llm, request)
    stream = await open_stream(llm, ids, params, adapter)

    async def events() -> AsyncIterator[str]:
        try:
            async for out in stream:
                yield sse(
                    GenerateResponse(
                        request_id=out.request_id,
                        adapter_name=adapter,
                        finished=out.finished,
                        outputs=[
                            CompletionOutput(
                                index=d.index,
                                text=d.text,
                                token_ids=d.token_ids,
                                finish_reason=_finish_reason(d.finish_reason),
                            )
                            for d in out.deltas
                        ],
                        usage=usage(out.prompt_tokens, out.completion_tokens),
                    ).model_dump(exclude_none=True)
                )
        except OpenLLMCloneError as exc:
            yield sse(exc.to_dict())
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


@routes.get("/metadata")
async def metadata(request: Request) -> dict[str, Any]:
    return llm_of(request).metadata()


@routes.post("/metadata")
async def metadata_post(request: Request) -> dict[str, Any]:
    return llm_of(request).metadata()
