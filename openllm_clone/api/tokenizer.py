"""vLLM's tokenizer routes at the server's root: ``POST /tokenize``, ``POST /detokenize``
and ``GET /tokenizer_info`` (what lm-eval's remote tokenizer calls)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from openllm_clone.errors import InvalidRequestError
from openllm_clone.protocol import ChatMessage

from .common import json_body, llm_of, parse_body

__all__ = ["DetokenizeRequest", "TokenizeRequest", "routes"]


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: a prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize`` body."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


# The tokenizer routes over the process's LLM.
routes = APIRouter()


@routes.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    llm = llm_of(request)
    body = parse_body(TokenizeRequest, await json_body(request))
    text = body.prompt if body.prompt is not None else llm.chat_prompt(body.messages or [])
    ids = list(llm.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"])
    return {
        "count": len(ids),
        "max_model_len": llm.info.max_model_len,
        "tokens": ids,
        "token_strs": llm.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    }


@routes.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    llm = llm_of(request)
    body = parse_body(DetokenizeRequest, await json_body(request))
    vocab = llm.info.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise InvalidRequestError(f"token ids must lie in 0..{vocab - 1}", param="tokens")
    return {"prompt": llm.tokenizer.decode(body.tokens)}


@routes.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    llm = llm_of(request)
    tok = llm.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "model_max_length": llm.info.max_model_len,
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": getattr(tok, "chat_template", None),
    }
