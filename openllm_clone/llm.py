"""The in-process LLM: model, tokenizer, engine and adapter registry behind one object.

The BentoML service, the embedded LangChain mode and the tests all talk to this; it
knows nothing of HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from openllm_clone import tenants
from openllm_clone.errors import (
    AdapterError,
    AdapterNotFoundError,
    InvalidRequestError,
    StartupError,
)
from openllm_clone.fatal import one_line
from openllm_clone.protocol import TGI_MODEL_NAME, ChatMessage, SamplingParams, new_request_id

from .adapters.shared import shared_adapters
from .engine.engine import Engine, EngineConfig, EngineObserver
from .engine.sequence import RequestOutput, TokenLogprob
from .runners.base import ModelInfo
from .settings import Settings

__all__ = ["LLM", "Completion"]

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished request, all outputs gathered."""

    request_id: str
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    logprobs: list[list[TokenLogprob]] | None = None  # per choice, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    """One base model with its adapters, ready to generate."""

    def __init__(
        self,
        runner: Any,
        tokenizer: Any,
        settings: Settings,
        *,
        name: str,
        aliases: list[str],
        observer: EngineObserver | None = None,
    ) -> None:
        from openllm_clone.adapters.registry import AdapterRegistry, EngineAdapterHost

        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self._token_strings: Any = None
        self.name = settings.model_name or name
        self.engine = Engine(
            runner,
            tokenizer,
            EngineConfig(
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_prefill_tokens=settings.prefill_budget,
                prefix_caching=settings.prefix_caching,
                seed=settings.seed,
                fair=settings.fair_scheduling,
            ),
            observer,
        )
        self.adapters = AdapterRegistry(
            EngineAdapterHost(runner, self.engine.call, settings.max_adapter_rank),
            max_loaded=settings.max_adapters,
            base_model_aliases=[runner.info.model_id, *aliases],
            roots=settings.adapter_roots,
            allow_pickle=settings.allow_pickle_adapters,
            max_bytes=settings.max_adapter_mb * 2**20,
            shared=shared_adapters(settings),
        )
        for spec in settings.adapters:
            self.adapters.register(spec.name, spec.source, pinned=spec.pinned, force=True)
        self._started = False
        self._grammars: Any = None

    @property
    def info(self) -> ModelInfo:
        """What the routes need to know about the model (id, vocabulary, context length)."""
        return self.runner.info

    @property
    def grammars(self) -> Any:
        """The grammar compiler for structured output (xgrammar, created on first use)."""
        if self._grammars is None:
            from openllm_clone.structured import GrammarFactory

            self._grammars = GrammarFactory(self.tokenizer, self.info.vocab_size)
        return self._grammars

    def constraint_for(self, response_format: dict[str, Any] | None) -> Any:
        """The decoding constraint an OpenAI ``response_format`` asks for, if any."""
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":  # OpenAI's json_object is an object, not any JSON value
            return self.grammars.json_schema({"type": "object"})
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequestError(
                    "response_format.json_schema.schema must be an object", param="response_format"
                )
            return self.grammars.json_schema(schema)
        raise InvalidRequestError(f"unknown response_format type {kind!r}", param="response_format")

    @classmethod
    def from_settings(
        cls, settings: Settings, observer: EngineObserver | None = None, *, warmup: bool = True
    ) -> LLM:
        """Resolve the model (importing the default if needed), load it, build the engine.
        ``warmup=False``: the caller runs :func:`~openllm_clone.runners.loader.warm_up`
        (on the thread that will run the steps)."""
        from openllm_clone.runners.loader import load_runner
        from openllm_clone.store import resolve_model

        resolved = resolve_model(settings.model)
        runner, tokenizer = load_runner(
            resolved.path, settings, model_id=resolved.tag or settings.model, warmup=warmup
        )
        return cls(
            runner,
            tokenizer,
            settings,
            name=resolved.name,
            aliases=resolved.aliases,
            observer=observer,
        )

    async def start(self, *, eager: bool = True) -> None:
        """Load the start-up adapters (once), then check the others named at start.

        ``eager=False`` (Ray replicas, which ran :meth:`check_adapters` when they were
        built) loads only the pinned ones: the others load on their first request, on
        the replica the router sends it to. An adapter that cannot be served raises
        :class:`StartupError` naming it and the reason; under ``--lenient-adapters`` it is
        logged and listed as failed instead.
        """
        if self._started:
            return
        self._started = True
        for spec in self.settings.adapters:
            if eager or spec.pinned:
                try:
                    await self.adapters.load(spec.name, spec.source, pinned=spec.pinned, force=True)
                except AdapterError as exc:
                    self._refused(f"adapter {spec.name!r} ({spec.source})", exc)
        if eager:
            await self.check_adapters()

    async def check_adapters(self) -> None:
        """Read and validate, as their load would and without loading them, the adapters
        named at start that have neither loaded nor failed yet: ``--adapter-id``'s, and
        those of the run-time adapters file (from an earlier run, loaded on first use)."""
        shared = self.adapters.shared
        named = {spec.name: spec.source for spec in self.settings.adapters}
        for name in self.adapters.names():
            record = self.adapters.get(name)
            if record is None or record.state in ("ready", "failed"):
                continue
            if name in named:
                where = f"adapter {name!r} ({named[name]})"
            elif record.shared and shared is not None:
                where = f"adapter {name!r} ({record.source}, listed in {shared.path})"
            else:
                continue
            try:
                await self.adapters.check(name)
            except AdapterError as exc:
                self._refused(where, exc)

    def _refused(self, adapter: str, exc: AdapterError) -> None:
        reason = f"{adapter} cannot be served: {one_line(exc)}"
        if not self.settings.lenient_adapters:
            raise StartupError(
                f"{reason}; start with --lenient-adapters to serve without it"
            ) from exc
        logger.error("%s (--lenient-adapters: serving without it)", reason)

    def shutdown(self) -> None:
        """Stop the engine thread (and a background compile)."""
        self.engine.shutdown()
        self.runner.close()

    # --- prompts ---------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a raw prompt (special tokens such as BOS added as the model wants)."""
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        """Render messages with the tokenizer's chat template."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        plain = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            content = m.text()
            if role == "tool" and "tool" not in template:
                # Templates without a tool role: hand the result over as the user's words.
                role, content = "user", f"Tool result: {content}\nUse this result to answer."
            plain.append({"role": role, "content": content})
        if template:
            try:
                return str(
                    self.tokenizer.apply_chat_template(
                        plain, tokenize=False, add_generation_prompt=True
                    )
                )
            except Exception as exc:  # jinja errors on unexpected roles
                raise InvalidRequestError(f"chat template failed: {exc}", param="messages") from exc
        lines = [f"{m['role']}: {m['content']}" for m in plain]
        return "\n".join([*lines, "assistant:"])

    @property
    def token_strings(self) -> Any:
        """Text and bytes of token ids (:class:`~openllm_clone.logprobs.TokenStrings`)."""
        if self._token_strings is None:
            from .logprobs import TokenStrings

            self._token_strings = TokenStrings(self.tokenizer)
        return self._token_strings

    def chat_prompt_text(self, text: str) -> str:
        """A single user message rendered with the chat template."""
        return self.chat_prompt([ChatMessage(role="user", content=text)])

    def base_names(self) -> list[str]:
        """The names a request may give the base model by: its name, its model id, and
        ``tgi`` (text-generation's chat() sends it) unless an adapter is called so."""
        names = [self.name, self.info.model_id]
        if self.adapters.get(TGI_MODEL_NAME) is None:
            names.append(TGI_MODEL_NAME)
        return names

    def resolve_model_name(self, model: str | None) -> str | None:
        """OpenAI ``model``: a name of the base model (or empty) means no adapter. An
        adapter outside the request's key scope gets the answer of a missing one."""
        if not model or model in self.base_names():
            return None
        if self.adapters.get(model) is None or not self.visible(model):
            raise AdapterNotFoundError(
                f"model {model!r} is neither the base model {self.name!r} nor a loaded adapter",
                param="model",
            )
        return model

    def visible(self, adapter: str) -> bool:
        """True when the request's key (if any) may use ``adapter``."""
        return self.visible_to(tenants.current_tenant.get(), adapter)

    @staticmethod
    def visible_to(entry: tenants.KeyEntry | None, adapter: str) -> bool:
        """True when ``entry`` (None: no authentication) may use ``adapter``; a merge of
        adapters is visible when each of its parts is."""
        from openllm_clone.adapters.merge import MERGE_PREFIX, parse_merge_name

        if entry is None:
            return True
        if adapter.startswith(MERGE_PREFIX):
            return all(entry.may_use(name) for name, _ in parse_merge_name(adapter))
        return entry.may_use(adapter)

    def visible_adapters(self) -> list[Any]:
        """The adapters (``AdapterInfo``) the request's key may use."""
        return [info for info in self.adapters.list() if self.visible(info.name)]

    @property
    def tenancy(self) -> tenants.Tenancy:
        """This process's keys, rate limits and usage meter (shared with the middleware)."""
        return tenants.tenancy_for(self.settings)

    def check_scope(self, adapter: str | None) -> None:
        """Refuse an adapter outside the request's key scope as the registry refuses a
        missing one (scopes do not leak names), and the base model to an adapter-only key."""
        if adapter is None:
            tenants.check_base_model()
        elif not self.visible(adapter):
            raise AdapterNotFoundError(f"adapter {adapter!r} is not loaded", param="adapter_name")

    # --- generation ------------------------------------------------------------------

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
        constraint: Any = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream outputs for one request, holding its adapter for the request's life."""
        self.check_scope(adapter)
        tenants.check_max_tokens(params.max_new_tokens)
        self.engine.check_prompt(prompt_ids, params)
        entry = tenants.current_tenant.get()
        ref = await self.adapters.acquire(adapter) if adapter else None
        last: RequestOutput | None = None
        try:
            async for out in self.engine.generate(
                prompt_ids,
                params,
                adapter=ref,
                request_id=request_id or new_request_id(),
                constraint=constraint,
                timeout=self.settings.timeout,
                tenant=entry.tenant if entry is not None else None,
                weight=entry.weight if entry is not None else 1.0,
            ):
                last = out
                yield out
        finally:
            sink = tenants.usage_sink.get()
            if sink is not None and last is not None:
                sink.append((last.prompt_tokens, last.completion_tokens))
            if adapter:
                await self.adapters.release(adapter)

    async def complete(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
        constraint: Any = None,
    ) -> Completion:
        """Run a request to the end and gather its outputs."""
        rid = request_id or new_request_id()
        texts = [""] * params.n
        tokens: list[list[int]] = [[] for _ in range(params.n)]
        reasons: list[str | None] = [None] * params.n
        logprobs: list[list[TokenLogprob]] | None = None
        if params.logprobs is not None:
            logprobs = [[] for _ in range(params.n)]
        prompt_logprobs = None
        prompt_tokens = completion_tokens = 0
        async for out in self.stream(
            prompt_ids, params, adapter=adapter, request_id=rid, constraint=constraint
        ):
            for delta in out.deltas:
                texts[delta.index] += delta.text
                tokens[delta.index].extend(delta.token_ids)
                if delta.finish_reason:
                    reasons[delta.index] = delta.finish_reason
                if logprobs is not None and delta.logprobs:
                    logprobs[delta.index].extend(delta.logprobs)
            if out.prompt_logprobs is not None:
                prompt_logprobs = out.prompt_logprobs
            prompt_tokens, completion_tokens = out.prompt_tokens, out.completion_tokens
        return Completion(
            rid,
            texts,
            tokens,
            reasons,
            prompt_tokens,
            completion_tokens,
            adapter,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def embed(
        self,
        prompt_ids: list[int],
        *,
        adapter: str | None = None,
        pooling: str = "last",
        normalize: bool = True,
        request_id: str | None = None,
    ) -> list[float]:
        """The embedding of a prompt: its final hidden states (with ``adapter``'s LoRA)
        pooled (``last`` token, or ``mean``), computed by the engine in its batches."""
        params = SamplingParams.model_validate(
            {"max_new_tokens": 0, "pooling": pooling, "normalize": normalize}
        )
        vector: list[float] | None = None
        async for out in self.stream(prompt_ids, params, adapter=adapter, request_id=request_id):
            vector = out.embedding if out.embedding is not None else vector
        if vector is None:  # the engine always sends it with the last output
            raise InvalidRequestError("the request ended without an embedding")
        return vector

    def metadata(self) -> dict[str, Any]:
        """Model and server facts for ``/v1/metadata``."""
        info = self.runner.info
        return {
            "model_id": info.model_id,
            "model_name": self.name,
            "architecture": info.architecture,
            "runner": info.extra.get("runner"),
            "dtype": info.dtype,
            "device": info.device,
            "quantization": info.quantization,
            "max_model_len": info.max_model_len,
            "num_parameters": info.num_parameters,
            "weight_bytes": info.weight_bytes,
            "adapters": [a for a in self.adapters.names() if self.visible(a)],
            "adapter_cache": {
                **self.adapters.cache_stats(),
                # The LoRA bank's float32 stacks for batches (bounded; see runners/lora.py).
                "stack_bytes": self.runner.lora.stack_bytes() if self.runner.lora else 0,
                # Adapters' own heads and embeddings (modules_to_save), resident per slot.
                "saved_bytes": self.runner.lora.saved_bytes() if self.runner.lora else 0,
            },
            "engine": self.engine.stats(),
            "compiled": self.runner.compiled_stats(),
            "config": {
                "max_batch_size": self.settings.max_batch_size,
                "max_queue": self.settings.max_queue,
                "max_adapters": self.settings.max_adapters,
                "max_adapter_rank": self.settings.max_adapter_rank,
                "kv_cache_mb": self.settings.kv_cache_mb,
                "block_size": self.settings.block_size,
                "timeout": self.settings.timeout,
                "auth": bool(
                    self.settings.api_keys
                    or self.settings.admin_api_keys
                    or self.settings.keys_file
                ),
                "scheduling": "fair" if self.settings.fair_scheduling else "fifo",
            },
        }
