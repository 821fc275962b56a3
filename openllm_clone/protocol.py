"""Request and response schemas shared by the server and the client (no torch here).

The OpenLLM routes follow OpenLLM 0.4's shapes (``prompt``, ``llm_config``,
``adapter_name``, ``outputs[]``); the OpenAI routes follow the OpenAI API.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from openllm_clone.errors import InvalidRequestError
from openllm_clone.tenants import cap_max_tokens

__all__ = [
    "SERVER_VERSION",
    "TGI_MODEL_NAME",
    "AdapterInfo",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionOutput",
    "CompletionRequest",
    "GenerateRequest",
    "GenerateResponse",
    "LoadAdapterRequest",
    "MAX_N",
    "MergedAdapters",
    "MAX_STOP",
    "NullMeansDefault",
    "RequestOutput",
    "SamplingParams",
    "SeqDelta",
    "TokenLogprob",
    "new_request_id",
]

# The model name text-generation's chat() sends (TGI serves one model): the base model,
# unless an adapter is called so.
TGI_MODEL_NAME = "tgi"
SERVER_VERSION = "0.1.0"  # what the routes say they are (OpenAPI, TGI's /info, fingerprints)

MAX_N = 16
MAX_PROMPTS = 64  # prompts in one completions request (each with n choices)
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_LOGPROBS = 20  # alternatives per token (OpenAI allows 20 on chat, 5 on completions)

FinishReason = Literal["stop", "length", "abort", "error"]


def new_request_id(prefix: str = "req") -> str:
    """A short unique request id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class SamplingParams(BaseModel):
    """How to sample one request; validated bounds give a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        default=128,
        ge=0,
        description="Most tokens to generate; 0 only scores the prompt (with prompt_logprobs).",
    )
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, le=100_000, description="0 means no top-k cut.")
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0, description="CTRL-style penalty; 1 is none."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP,
        description="Strings that end generation; they are not returned.",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="Same seed, same output."
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="Completions per prompt.")
    pooling: Literal["last", "mean"] | None = Field(
        default=None,
        description="An embedding request (with max_new_tokens 0): the prompt's final hidden "
        "states pooled, its last token's or their mean.",
    )
    normalize: bool = Field(default=True, description="An embedding of unit length (L2).")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past end-of-sequence (benchmarks)."
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from a token's logit once per time it was generated.",
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted once from the logit of every token generated so far.",
    )
    logit_bias: dict[int, float] | None = Field(
        default=None,
        max_length=1024,
        description="Token id -> bias in [-100, 100] added to its logit before sampling.",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each generated token's log-probability and this many most likely "
        "alternatives (log_softmax of the model's logits, before penalties and temperature).",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each prompt token's log-probability (the first has none) and this "
        "many alternatives; the prompt is then computed whole, not taken from the prefix cache.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if not value:
            return None
        for token, bias in value.items():
            if not 0 <= token < 2**31:
                raise ValueError(f"logit_bias token ids must lie in 0..2**31-1, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {bias}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        for s in value:
            if not s or len(s) > MAX_STOP_LEN:
                raise ValueError(f"stop strings must have 1 to {MAX_STOP_LEN} characters")
        return value

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily."""
        return self.temperature == 0.0


class MergedAdapters(BaseModel):
    """A per-request weighted merge of loaded adapters (LoRAX's ``merged_adapters``)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(min_length=2, max_length=8, description="Adapter names to merge.")
    weights: list[float] = Field(min_length=2, max_length=8, description="One weight per adapter.")
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = (
        Field(
            default="linear",
            description="'linear': the exact weighted sum of the deltas; 'ties', 'dare_linear', "
            "'dare_ties', 'magnitude_prune': peft's add_weighted_adapter combinations (the "
            "adapters must share one rank).",
        )
    )
    density: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fraction of each delta's values kept by ties, dare_* and magnitude_prune "
        "(default 1: none pruned).",
    )
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        default=None, description="How ties and dare_ties elect each value's sign (default total)."
    )

    @model_validator(mode="after")
    def _same_length(self) -> MergedAdapters:
        if len(self.ids) != len(self.weights):
            raise ValueError("ids and weights must have the same length")
        if any(not -10.0 <= w <= 10.0 for w in self.weights):
            raise ValueError("weights must lie in [-10, 10]")
        return self


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate`` and ``/v1/generate_stream`` (OpenLLM 0.4 shape).

    Sampling fields may be given inside ``llm_config`` (as OpenLLM did) or at the top
    level; top-level values win.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The prompt text.")
    llm_config: dict[str, Any] = Field(
        default_factory=dict, description="Sampling parameters, OpenLLM style."
    )
    adapter_name: str | None = Field(default=None, description="Adapter to apply.")
    merged_adapters: MergedAdapters | None = Field(
        default=None, description="Merge several adapters for this request."
    )
    stop: list[str] | str | None = Field(default=None, description="Stop strings.")
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int | None = None
    ignore_eos: bool | None = None

    def sampling_params(self) -> SamplingParams:
        """Merge ``llm_config`` and top-level fields into validated sampling params."""
        merged: dict[str, Any] = dict(self.llm_config)
        for key in SamplingParams.model_fields:
            value = getattr(self, key, None)
            if value is not None:
                merged[key] = value
        if merged.get("max_new_tokens") is None:
            default = SamplingParams.model_fields["max_new_tokens"].default
            merged["max_new_tokens"] = cap_max_tokens(default)
        params = SamplingParams.model_validate(merged)
        if params.max_new_tokens < 1:  # no prompt scoring on this route: 0 would do nothing
            raise InvalidRequestError("max_new_tokens: must be at least 1", param="max_new_tokens")
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise InvalidRequestError(
                "logprobs are served on /v1/completions and /v1/chat/completions", param="logprobs"
            )
        return params


class CompletionOutput(BaseModel):
    """One completion of a request (``n`` of them per request)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None


class GenerateResponse(BaseModel):
    """Answer of ``POST /v1/generate`` and each ``/v1/generate_stream`` event."""

    request_id: str
    prompt: str | None = None
    adapter_name: str | None = None
    finished: bool
    outputs: list[CompletionOutput]
    prompt_token_ids: list[int] | None = None
    usage: dict[str, int] | None = None


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as plain text (an assistant's tool calls as their JSON)."""
        calls = getattr(self, "tool_calls", None)
        if self.content is None and calls:
            rendered = []
            for call in calls:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = fn.get("arguments")
                rendered.append(json.dumps({"name": fn.get("name"), "arguments": args}))
            return "\n".join(rendered)
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``."""

    include_usage: bool = False


class NullMeansDefault(BaseModel):
    """A body where an explicit ``null`` means "not given" (OpenAI and TGI read it so): the
    field's default applies."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _OpenAISampling(NullMeansDefault):
    """Fields the OpenAI completion and chat requests share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Base model name or an adapter name.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    merged_adapters: MergedAdapters | None = None

    def _sampling(
        self,
        max_tokens: int | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_tokens if max_tokens is not None else cap_max_tokens(16),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k or 0, 0),
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=self.stop,  # type: ignore[arg-type]
            seed=self.seed,
            n=self.n,
            ignore_eos=self.ignore_eos,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
        )


class CompletionRequest(_OpenAISampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, a list of token ids, or a list of token-id lists; "
        "each prompt gets n choices, indexed prompt * n + i as OpenAI does."
    )
    max_tokens: int | None = Field(
        default=16, ge=0, description="0 with echo and logprobs scores the prompt only."
    )
    echo: bool = False
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Logprobs of the chosen tokens and this many alternatives (of the prompt's "
        "too with echo).",
    )
    response_format: dict[str, Any] | None = Field(
        default=None, description="text, json_object, or json_schema (constrained decoding)."
    )

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(v, list) and not v for v in value):
                raise ValueError("a token-id prompt must not be empty")
            flat = [
                t for v in value for t in (v if isinstance(v, list) else [v]) if isinstance(t, int)
            ]
            if any(not 0 <= t < 2**31 for t in flat):
                raise ValueError("token ids must lie in 0..2**31-1")
        elif not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        """Validated sampling parameters."""
        return self._sampling(self.max_tokens, self.logprobs, self.logprobs if self.echo else None)


class ChatCompletionRequest(_OpenAISampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = Field(
        default=None, description="text, json_object, or json_schema (constrained decoding)."
    )
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool = Field(default=False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Alternatives per token (needs logprobs: true; with model 'tgi', "
        "text-generation's chat(), it implies it).",
    )

    @model_validator(mode="after")
    def _text_only(self) -> ChatCompletionRequest:
        for message in self.messages:
            message.text()
        if self.top_logprobs is not None and not self.logprobs:
            if self.model != TGI_MODEL_NAME:
                raise ValueError("top_logprobs needs logprobs: true")
            # TGI's surface (text-generation's chat() sends top_logprobs alone): asking
            # for alternatives asks for logprobs.
            self.logprobs = True
        return self

    def sampling_params(self, default_max: int) -> SamplingParams:
        """Validated sampling parameters; ``default_max`` when no limit is given."""
        limit = self.max_completion_tokens or self.max_tokens or default_max
        return self._sampling(limit, (self.top_logprobs or 0) if self.logprobs else None)


class LoadAdapterRequest(BaseModel):
    """Body of ``POST /v1/adapters``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    source: str = Field(min_length=1, max_length=4096)
    pinned: bool = False
    force: bool = Field(default=False, description="Accept an adapter made for another base model.")


class AdapterInfo(BaseModel):
    """What ``GET /v1/adapters`` says of one adapter."""

    name: str
    source: str
    kind: str | None = Field(
        default=None,
        description="lora, or merge (linear | ties | ...) for a per-request merge; known once "
        "read (None while only registered)",
    )
    state: Literal["registered", "ready", "failed"] = Field(
        description="registered: loads on first use; ready: in a slot; failed: its last "
        "load was refused (``error`` says why; the next request tries again)"
    )
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    pinned: bool = False
    requests_served: int = 0
    base_model: str | None = None
    error: str | None = None


def unix_time() -> int:
    """Seconds since the epoch (OpenAI ``created``)."""
    return int(time.time())


# --- what the engine streams back (plain dataclasses: made once per step and token) ---


@dataclass
class TokenLogprob:
    """A token's log-probability and the ``top`` most likely tokens at its position
    (``(token id, logprob)``, most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SeqDelta:
    """What one sequence produced in one step (``logprobs``: one per token, when asked)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """One streamed event of a request: deltas of its sequences, and usage so far."""

    request_id: str
    deltas: list[SeqDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool
    error: str | None = None
    error_status: int = 500
    # Once per request, with the first output after the prompt is computed, when asked:
    # one entry per prompt token, the first None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # An embedding request's pooled vector, with its last output.
    embedding: list[float] | None = None
