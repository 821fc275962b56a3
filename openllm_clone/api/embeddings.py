"""Embeddings: OpenAI's ``POST /v1/embeddings`` and LoRAX's ``POST /embed``.

An embedding is the prompt's final hidden states (after the model's last norm), pooled:
the last token's (the default: a causal LM's last position has seen the whole text) or
their mean, L2-normalised unless asked otherwise. The engine computes it in its batches,
beside generation, with the adapter ``model`` names applied (its LoRA in every layer),
under the same keys, scopes, limits and metering as generation.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from openllm_clone.errors import InvalidRequestError
from openllm_clone.protocol import MergedAdapters, new_request_id

from .common import adapter_for, json_body, llm_of, parse_body, served_name

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["EmbedRequest", "EmbeddingRequest", "MAX_INPUTS", "root_routes", "routes"]

routes = APIRouter()  # under /v1
root_routes = APIRouter()  # LoRAX's, at the root

MAX_INPUTS = 2048  # inputs per request, as OpenAI's


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings`` (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model name or an adapter name.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, token ids, or lists of token ids."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        default=None, ge=1, description="Only the model's hidden size (no truncation)."
    )
    user: str | None = None
    pooling: Literal["last", "mean"] = Field(
        default="last", description="The last token's hidden state, or the mean of all."
    )
    normalize: bool = Field(default=True, description="L2-normalise each embedding.")
    merged_adapters: MergedAdapters | None = None


class EmbedParameters(BaseModel):
    """LoRAX's ``/embed`` parameters."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = None
    merged_adapters: MergedAdapters | None = None


class EmbedRequest(BaseModel):
    """Body of LoRAX's ``POST /embed``."""

    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: EmbedParameters | None = None


def _prompts(llm: LLM, value: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Each input's token ids (texts tokenized as the completions route does)."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]
    else:
        items = list(value)
    if not items or len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"input takes 1 to {MAX_INPUTS} items", param="input")
    prompts = []
    for item in items:
        ids = llm.tokenize(item) if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidRequestError("an input is empty", param="input")
        if any(not 0 <= t < llm.info.vocab_size for t in ids):
            raise InvalidRequestError("a token id is outside the vocabulary", param="input")
        if len(ids) > llm.info.max_model_len:
            raise InvalidRequestError(
                f"an input of {len(ids)} tokens is longer than the context "
                f"({llm.info.max_model_len})",
                param="input",
            )
        prompts.append(ids)
    return prompts


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@routes.post("/embeddings")
async def embeddings(request: Request) -> Any:
    llm = llm_of(request)
    body = parse_body(EmbeddingRequest, await json_body(request))
    hidden = llm.info.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise InvalidRequestError(
            f"this model's embeddings have {hidden} dimensions and cannot be shortened",
            param="dimensions",
        )
    adapter = await adapter_for(llm, llm.resolve_model_name(body.model), body.merged_adapters)
    prompts = _prompts(llm, body.input)
    rid = new_request_id("embd")
    vectors = await asyncio.gather(
        *(
            llm.embed(
                ids,
                adapter=adapter,
                pooling=body.pooling,
                normalize=body.normalize,
                request_id=f"{rid}-{i}",
            )
            for i, ids in enumerate(prompts)
        )
    )
    tokens = sum(len(ids) for ids in prompts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": served_name(llm, body.model, adapter),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@root_routes.post("/embed")
async def embed(request: Request) -> Any:
    llm = llm_of(request)
    body = parse_body(EmbedRequest, await json_body(request))
    params = body.parameters or EmbedParameters()
    name = params.adapter_id
    if name in (llm.name, llm.info.model_id, ""):
        name = None
    adapter = await adapter_for(llm, name, params.merged_adapters)
    ids = _prompts(llm, body.inputs)[0]
    return {"embeddings": await llm.embed(ids, adapter=adapter)}
