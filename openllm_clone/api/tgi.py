"""TGI's and LoRAX's routes, at the server's root: ``POST /`` (what both clients call: a
list of one answer, or a stream when ``stream`` is true), ``POST /generate``,
``POST /generate_stream`` and ``GET /info``, with their request shape (``inputs``,
``parameters``), answers (``generated_text``, ``details``), SSE events (``token``,
``generated_text``, ``details``) and error shape (``{"error", "error_type"}``), so that
``text-generation`` and ``lorax-client`` run unchanged.

``adapter_id`` names an adapter as the other routes do (loaded, registered, or
just-in-time from the model store); ``adapter_source="local"`` loads a folder under
``--adapter-root``. A parameter this server cannot honour is refused (422), never ignored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openllm_clone.errors import CapacityError, InvalidRequestError, OpenLLMCloneError
from openllm_clone.protocol import (
    MAX_LOGPROBS,
    MAX_N,
    SERVER_VERSION,
    NullMeansDefault,
    SamplingParams,
    new_request_id,
)
from openllm_clone.tenants import cap_max_tokens

from .common import json_body, llm_of, merged_adapter, parse_body, sse, validation_error

if TYPE_CHECKING:
    from openllm_clone.llm import LLM

__all__ = ["PATHS", "TGIParameters", "TGIRequest", "error_response", "routes"]

PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})


class TGIMergedAdapters(BaseModel):
    """LoRAX's ``merged_adapters``: ``linear`` (the exact weighted sum, the default),
    ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune`` (peft's combinations;
    see :mod:`openllm_clone.adapters.merge`)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=2, max_length=8)
    weights: list[float] = Field(min_length=2, max_length=8)
    merge_strategy: (
        Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] | None
    ) = None
    density: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of each delta kept by ties, dare_* and magnitude_prune.",
    )
    majority_sign_method: Literal["total", "frequency"] | None = None


class TGIParameters(NullMeansDefault):
    """``parameters`` of a TGI / LoRAX request."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(default=None, max_length=4096)
    adapter_source: Literal["hub", "local"] | None = None
    merged_adapters: TGIMergedAdapters | None = None
    api_token: None = Field(default=None, description="Adapters are never downloaded here.")
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    truncate: int | None = Field(default=None, gt=0)
    typical_p: None = Field(default=None, description="Typical sampling is not implemented.")
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    watermark: Literal[False] = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    grammar: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to or when any warper is set."""
        if self.temperature == 0.0:
            return False
        return self.do_sample or any(
            v is not None for v in (self.temperature, self.top_k, self.top_p)
        )


class TGIRequest(BaseModel):
    """Body of ``POST /``, ``/generate`` and ``/generate_stream``."""

    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("parameters") is None:
            data = {k: v for k, v in data.items() if k != "parameters"}
        return data


def error_response(exc: OpenLLMCloneError) -> JSONResponse:
    """TGI's error shape; bad input is its 422 ``validation``."""
    if isinstance(exc, InvalidRequestError):
        return JSONResponse({"error": exc.message, "error_type": "validation"}, status_code=422)
    kind = (
        "overloaded"
        if isinstance(exc, CapacityError)
        else ("generation" if exc.status_code >= 500 else exc.error_type)
    )
    headers = (
        {"Retry-After": str(max(1, round(exc.retry_after)))}
        if isinstance(exc, CapacityError)
        else {}
    )
    return JSONResponse(
        {"error": exc.message, "error_type": kind}, status_code=exc.status_code, headers=headers
    )


class _Plan:
    """What a TGI request asks of the engine."""

    def __init__(self, llm: LLM, body: TGIRequest) -> None:
        p = body.parameters
        if p.grammar is not None and p.response_format is not None:
            raise InvalidRequestError("give grammar or response_format, not both", param="grammar")
        if p.adapter_id and p.merged_adapters:
            raise InvalidRequestError(
                "give adapter_id or merged_adapters, not both", param="adapter_id"
            )
        if (p.best_of or 1) > 1:
            if body.stream:
                raise InvalidRequestError("best_of > 1 cannot stream", param="best_of")
            if not p.sampling:
                raise InvalidRequestError(
                    "best_of > 1 needs sampling (do_sample or a temperature)", param="best_of"
                )
        self.ids = llm.tokenize(body.inputs)
        if p.truncate is not None:
            self.ids = self.ids[-p.truncate :]  # TGI keeps the prompt's last tokens
        self.top = p.top_n_tokens if p.top_n_tokens is not None else (p.return_k_alternatives or 0)
        remaining = max(1, llm.info.max_model_len - len(self.ids))
        try:
            self.params = SamplingParams(
                # LoRAX's default: up to the context's end (capped as chat's default is).
                max_new_tokens=p.max_new_tokens or cap_max_tokens(min(remaining, 4096)),
                temperature=(p.temperature if p.temperature is not None else 1.0)
                if p.sampling
                else 0.0,
                top_p=p.top_p or 1.0,
                top_k=p.top_k or 0,
                repetition_penalty=p.repetition_penalty or 1.0,
                frequency_penalty=p.frequency_penalty or 0.0,
                stop=p.stop,
                seed=p.seed,
                n=p.best_of or 1,
                ignore_eos=p.ignore_eos_token,
                logprobs=self.top,  # every token carries its logprob in TGI's answers
                prompt_logprobs=self.top if p.decoder_input_details else None,
            )
        except ValidationError as exc:
            raise validation_error(exc) from exc
        self.constraint = llm.constraint_for(self._response_format(p))
        self.details = p.details
        self.decoder_input_details = p.decoder_input_details
        self.return_full_text = p.return_full_text
        self.body = body

    @staticmethod
    def _response_format(p: TGIParameters) -> dict[str, Any] | None:
        if p.response_format is not None:  # LoRAX: {"type": "json_object", "schema": {...}}
            schema = p.response_format.get("schema")
            if p.response_format.get("type") != "json_object":
                raise InvalidRequestError(
                    "response_format.type must be json_object", param="response_format"
                )
            if schema is None:
                return {"type": "json_object"}
            return {"type": "json_schema", "json_schema": {"schema": schema}}
        if p.grammar is not None:  # TGI: {"type": "json", "value": schema}
            if p.grammar.get("type") != "json":
                raise InvalidRequestError(
                    "only JSON grammars are supported (regex grammars are not)", param="grammar"
                )
            value = p.grammar.get("value")
            return {"type": "json_schema", "json_schema": {"schema": value}}
        return None


async def _adapter(llm: LLM, p: TGIParameters) -> str | None:
    """The adapter a TGI request names (None: the base model)."""
    if p.merged_adapters is not None:
        m = p.merged_adapters
        if len(m.ids) != len(m.weights):
            raise InvalidRequestError(
                "merged_adapters ids and weights differ in length", param="merged_adapters"
            )
        return await merged_adapter(
            llm,
            m.ids,
            m.weights,
            strategy=m.merge_strategy or "linear",
            density=m.density,
            majority_sign_method=m.majority_sign_method,
        )
    name = p.adapter_id
    if not name or name in (llm.name, llm.info.model_id):
        return None
    llm.check_scope(name)  # before a local folder is read
    if p.adapter_source == "local":
        if not llm.adapters.roots:
            raise InvalidRequestError(
                "adapter_source='local' needs the server started with --adapter-root (the "
                "folders requests may load adapters from)",
                param="adapter_source",
            )
        if llm.adapters.get(name) is None:
            await llm.adapters.load(name, name)  # the path is checked against the roots
    return name  # a loaded or registered name, or one in the model store (loaded on use)


def _finish(llm: LLM, reason: str | None, tokens: list[int], params: SamplingParams) -> str:
    if reason == "length":
        return "length"
    if tokens and tokens[-1] in llm.engine.eos_ids and not params.ignore_eos:
        return "eos_token"
    return "stop_sequence"


def _token(llm: LLM, entry: Any, plan: _Plan) -> dict[str, Any]:
    strings = llm.token_strings
    out: dict[str, Any] = {
        "id": entry.token_id,
        "text": strings.text(entry.token_id),
        "logprob": entry.logprob,
        "special": strings.special(entry.token_id),
    }
    if plan.top:
        out["alternative_tokens"] = [
            {"id": t, "text": strings.text(t), "logprob": v} for t, v in entry.top
        ]
    return out


def _top_tokens(llm: LLM, entry: Any) -> list[dict[str, Any]]:
    strings = llm.token_strings
    return [
        {"id": t, "text": strings.text(t), "logprob": v, "special": strings.special(t)}
        for t, v in entry.top
    ]


def _prefill(llm: LLM, plan: _Plan, prompt_lp: list[Any] | None) -> list[dict[str, Any]]:
    if not plan.decoder_input_details or prompt_lp is None:
        return []
    strings = llm.token_strings
    return [
        {"id": t, "text": strings.text(t), "logprob": None if e is None else e.logprob}
        for t, e in zip(plan.ids, prompt_lp, strict=True)
    ]


# The TGI / LoRAX routes over the process's LLM.
routes = APIRouter()


async def _plan(request: Request, stream: bool | None = None) -> tuple[LLM, _Plan, str | None]:
    """``stream``: what the route does (``POST /`` goes by the body's ``stream``)."""
    llm = llm_of(request)
    body = parse_body(TGIRequest, await json_body(request))
    if stream is not None:
        body = body.model_copy(update={"stream": stream})
    plan = _Plan(llm, body)
    adapter = await _adapter(llm, body.parameters)
    llm.engine.check_prompt(plan.ids, plan.params)
    return llm, plan, adapter


async def _answer(llm: LLM, plan: _Plan, adapter: str | None) -> dict[str, Any]:
    result = await llm.complete(plan.ids, plan.params, adapter=adapter, constraint=plan.constraint)
    assert result.logprobs is not None
    n = len(result.texts)

    def total(i: int) -> float:
        return sum((e.logprob for e in result.logprobs[i]), 0.0)  # type: ignore[index]

    order = sorted(range(n), key=total, reverse=True)  # best_of: the likeliest sample wins
    prefix = plan.body.inputs if plan.return_full_text else ""

    def sequence(i: int) -> dict[str, Any]:
        tokens = result.token_ids[i]
        return {
            "generated_text": prefix + result.texts[i],
            "finish_reason": _finish(llm, result.finish_reasons[i], tokens, plan.params),
            "generated_tokens": len(tokens),
            "seed": plan.params.seed,
            "prefill": _prefill(llm, plan, result.prompt_logprobs),
            "tokens": [_token(llm, e, plan) for e in result.logprobs[i]],  # type: ignore[index]
            **(
                {"top_tokens": [_top_tokens(llm, e) for e in result.logprobs[i]]}  # type: ignore[index]
                if plan.top
                else {}
            ),
        }

    best = sequence(order[0])
    answer: dict[str, Any] = {"generated_text": best.pop("generated_text")}
    if plan.details:
        best["prompt_tokens"] = result.prompt_tokens
        if n > 1:
            best["best_of_sequences"] = [sequence(i) for i in order[1:]]
        answer["details"] = best
    return answer


def _stream(llm: LLM, plan: _Plan, adapter: str | None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        text = plan.body.inputs if plan.return_full_text else ""
        tokens: list[int] = []
        try:
            async for out in llm.stream(
                plan.ids,
                plan.params,
                adapter=adapter,
                request_id=new_request_id("tgi"),
                constraint=plan.constraint,
            ):
                for d in out.deltas:
                    text += d.text
                    tokens.extend(d.token_ids)
                    for k, entry in enumerate(d.logprobs or []):
                        last = d.finish_reason is not None and k == len(d.logprobs or []) - 1
                        event: dict[str, Any] = {
                            "token": _token(llm, entry, plan),
                            "generated_text": text if last else None,
                            "details": None,
                        }
                        if plan.top:
                            event["top_tokens"] = _top_tokens(llm, entry)
                        if last:
                            event["details"] = {
                                "finish_reason": _finish(llm, d.finish_reason, tokens, plan.params),
                                "generated_tokens": len(tokens),
                                "prompt_tokens": out.prompt_tokens,
                                "seed": plan.params.seed,
                            }
                        yield sse(event)
        except OpenLLMCloneError as exc:
            yield sse({"error": exc.message, "error_type": "generation"})

    return StreamingResponse(events(), media_type="text/event-stream")


@routes.post("/")
async def compat(request: Request) -> Any:
    llm, plan, adapter = await _plan(request)
    if plan.body.stream:
        return _stream(llm, plan, adapter)
    return [await _answer(llm, plan, adapter)]


@routes.post("/generate")
async def generate(request: Request) -> Any:
    llm, plan, adapter = await _plan(request, stream=False)
    return await _answer(llm, plan, adapter)


@routes.post("/generate_stream")
async def generate_stream(request: Request) -> Any:
    llm, plan, adapter = await _plan(request, stream=True)
    return _stream(llm, plan, adapter)


@routes.get("/info")
async def info(request: Request) -> dict[str, Any]:
    llm = llm_of(request)
    meta = llm.info
    return {
        "model_id": meta.model_id,
        "model_dtype": meta.dtype,
        "model_device_type": meta.device,
        "max_input_length": meta.max_model_len - 1,
        "max_total_tokens": meta.max_model_len,
        "max_concurrent_requests": llm.settings.max_batch_size + llm.settings.max_queue,
        "max_best_of": MAX_N,
        "max_stop_sequences": 16,
        "router": "openllm-clone",
        "version": SERVER_VERSION,
        "adapters": llm.adapters.names(),
    }
