"""The BentoML service: one LLM per worker process, the /v1 routes, Prometheus metrics.

BentoML provides ``/livez``, ``/readyz``, ``/metrics`` and ``/healthz``; the
OpenLLM, OpenAI and adapter routes are a FastAPI app mounted under ``/v1``; the TGI/LoRAX
and tokenizer routes (:mod:`openllm_clone.api.tgi`, :mod:`openllm_clone.api.tokenizer`) a second one at the root, which BentoML
mounts passively (only paths it serves reach it).
Settings arrive through ``OPENLLM_CLONE_SETTINGS`` (set by ``openllm-clone start``
or baked into a bento) and are read in ``__init__``, never at import time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import bentoml

from openllm_clone.api import build_app, build_root_app
from openllm_clone.engine.config import EngineObserver
from openllm_clone.engine.sequence import RequestGroup
from openllm_clone.errors import ModelLoadError, NotReadyError
from openllm_clone.fatal import die_with_parent, one_line, report_fatal, watch_for_fatal_errors
from openllm_clone.limits import AdapterLabels
from openllm_clone.middleware import GuardMiddleware
from openllm_clone.readiness import readiness
from openllm_clone.settings import Settings
from openllm_clone.tenants import Tenancy, reload_marker, request_reload, tenancy_for

__all__ = ["LLMService"]

logger = logging.getLogger(__name__)
request_log = logging.getLogger("openllm_clone.requests")

_state: dict[str, Any] = {}
MAX_ADAPTER_LABELS = 64  # adapter label values per process: the most used, then "other"


def _llm() -> Any:
    llm = _state.get("llm")
    if llm is None:
        raise readiness.error() or NotReadyError("the server is starting", retry_after=5.0)
    return llm


def _sighup_rereads_keys() -> None:
    """SIGHUP to the server (``openllm-clone start``, or ``bentoml serve`` of a bento)
    re-reads the keys file in every worker, which go on serving. BentoML's process
    manager (circus) would restart every worker on SIGHUP: the model reloaded, streams in
    flight cut. Runs where the service is imported: in the process that starts the
    workers (before they start, so they inherit the marker's name), and in each worker,
    where it changes nothing (they never handle SIGHUP through circus)."""
    try:
        from circus.sighandler import SysHandler
    except ImportError:  # not served by BentoML's process manager
        return
    reload_marker(create=True)

    def handle_hup(_handler: Any) -> None:
        keys_file = Settings.from_env().keys_file
        line = request_reload(keys_file) if keys_file else "SIGHUP: no keys file to re-read"
        # BentoML's logging setup drops our loggers in this process: its console instead.
        print(line, file=sys.stderr, flush=True)

    SysHandler.handle_hup = handle_hup  # type: ignore[method-assign]


def _bentoml_serve_exits_when_a_worker_cannot_start() -> None:
    """``bentoml serve`` of a bento (the process that starts the workers imports this
    module first) ends, status 1, with the reason when a worker cannot start, as
    ``openllm-clone start`` does (which watches on its own)."""
    from openllm_clone.settings import FATAL_FILE_ENV

    if sys.argv[1:2] == ["serve"] and FATAL_FILE_ENV not in os.environ:
        watch_for_fatal_errors()


_sighup_rereads_keys()
_bentoml_serve_exits_when_a_worker_cannot_start()
app = build_app(_llm)
root_app = build_root_app(_llm)  # TGI/LoRAX and tokenizer routes: only its own paths match


class PrometheusObserver(EngineObserver):
    """Engine events as Prometheus metrics (names after TGI's) and one log line per request."""

    def __init__(
        self, log_prompts: bool = False, tokenizer: Any = None, tenancy: Tenancy | None = None
    ) -> None:
        self.log_prompts = log_prompts
        self.tokenizer = tokenizer
        self.tenancy = tenancy
        self._adapter_labels = AdapterLabels(MAX_ADAPTER_LABELS)
        latency_buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        token_buckets = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
        self.requests = bentoml.metrics.Counter(
            name="openllm_clone_requests_total",
            documentation="Requests that reached the engine, by final status and adapter",
            labelnames=["status", "adapter"],
        )
        self.duration = bentoml.metrics.Histogram(
            name="openllm_clone_request_duration_seconds",
            documentation="Time from arrival to the last token",
            buckets=latency_buckets,
        )
        self.ttft = bentoml.metrics.Histogram(
            name="openllm_clone_time_to_first_token_seconds",
            documentation="Time from arrival to the first token",
            buckets=latency_buckets,
        )
        self.tpot = bentoml.metrics.Histogram(
            name="openllm_clone_time_per_output_token_seconds",
            documentation="Mean time between output tokens of a request",
            buckets=token_buckets,
        )
        self.generated = bentoml.metrics.Counter(
            name="openllm_clone_generated_tokens_total",
            documentation="Tokens generated",
        )
        self.prompt = bentoml.metrics.Counter(
            name="openllm_clone_prompt_tokens_total",
            documentation="Prompt tokens processed",
        )
        self.queue = bentoml.metrics.Gauge(
            name="openllm_clone_queue_size",
            documentation="Sequences waiting to join the batch",
            multiprocess_mode="livesum",
        )
        self.batch = bentoml.metrics.Gauge(
            name="openllm_clone_batch_size",
            documentation="Sequences in the running batch",
            multiprocess_mode="livesum",
        )
        self.isolated = bentoml.metrics.Counter(
            name="openllm_clone_step_fault_isolations_total",
            documentation="Rows failed alone after a batched forward raised (the rest went on)",
        )
        # Per tenant and adapter (metering). Tenants are bounded by the keys file; adapter
        # labels by AdapterLabels: the MAX_ADAPTER_LABELS with the most traffic in this
        # process, the rest "other".
        self.tenant_requests = bentoml.metrics.Counter(
            name="openllm_clone_tenant_requests_total",
            documentation="Requests that reached the engine, by tenant, adapter and status",
            labelnames=["tenant", "adapter", "status"],
        )
        self.tenant_tokens = bentoml.metrics.Counter(
            name="openllm_clone_tenant_tokens_total",
            documentation="Tokens computed for a tenant, by adapter and kind (prompt, completion)",
            labelnames=["tenant", "adapter", "kind"],
        )
        self.tenant_ttft = bentoml.metrics.Histogram(
            name="openllm_clone_tenant_time_to_first_token_seconds",
            documentation="Time from arrival to the first token, by tenant and adapter",
            labelnames=["tenant", "adapter"],
            buckets=latency_buckets,
        )
        self.tenant_latency = bentoml.metrics.Histogram(
            name="openllm_clone_tenant_request_duration_seconds",
            documentation="Time from arrival to the last token, by tenant and adapter",
            labelnames=["tenant", "adapter"],
            buckets=latency_buckets,
        )
        self.kv = bentoml.metrics.Gauge(
            name="openllm_clone_kv_cache_blocks_used",
            documentation="KV-cache blocks in use",
            multiprocess_mode="livesum",
        )

    def on_step(self, running: int, waiting: int, kv_used: int, kv_total: int) -> None:
        self.batch.set(running)
        self.queue.set(waiting)
        self.kv.set(kv_used)

    def on_fault_isolated(self, rows: int) -> None:
        self.isolated.inc(rows)

    def on_first_token(self, group: RequestGroup, ttft: float) -> None:
        self.ttft.observe(ttft)
        if group.tenant is not None:
            adapter = self._adapter_labels.label(group.adapter_name)
            self.tenant_ttft.labels(tenant=group.tenant, adapter=adapter).observe(ttft)

    def _meter(self, group: RequestGroup, status: str, latency: float, adapter: str) -> None:
        """Usage per tenant and adapter: /v1/usage, the tokens-per-minute limits, metrics
        (``adapter``: the request's adapter label value)."""
        prompt, completion = len(group.prompt_ids), group.completion_tokens()
        tenant = group.tenant or "-"
        if self.tenancy is not None:
            self.tenancy.meter.record(tenant, group.adapter_name, status, prompt, completion)
            if group.tenant is not None:
                self.tenancy.limiter.record_tokens(group.tenant, prompt + completion)
        if group.tenant is None:
            return
        self.tenant_requests.labels(tenant=tenant, adapter=adapter, status=status).inc()
        self.tenant_tokens.labels(tenant=tenant, adapter=adapter, kind="prompt").inc(prompt)
        self.tenant_tokens.labels(tenant=tenant, adapter=adapter, kind="completion").inc(completion)
        self.tenant_latency.labels(tenant=tenant, adapter=adapter).observe(latency)

    def on_finished(self, group: RequestGroup, status: str, latency: float) -> None:
        generated = group.completion_tokens()
        # One structured line per request; never the prompt or the output text.
        line: dict[str, Any] = {
            "request_id": group.request_id,
            "worker": os.getpid(),
            "adapter": group.adapter_name,
            "tenant": group.tenant,
            "status": status,
            "prompt_tokens": len(group.prompt_ids),
            "completion_tokens": generated,
            "latency_ms": round(1000 * latency, 1),
            "ttft_ms": round(1000 * (group.first_token_at - group.arrival), 1)
            if group.first_token_at is not None
            else None,
        }
        if self.log_prompts and self.tokenizer is not None:
            line["prompt"] = self.tokenizer.decode(group.prompt_ids)
        request_log.info(json.dumps(line))
        adapter = self._adapter_labels.record(group.adapter_name, len(group.prompt_ids) + generated)
        self._meter(group, status, latency, adapter)
        self.requests.labels(status=status, adapter=adapter).inc()
        self.duration.observe(latency)
        self.generated.inc(generated)
        self.prompt.inc(len(group.prompt_ids))
        if group.first_token_at is not None and generated > 1:
            self.tpot.observe((group.arrival + latency - group.first_token_at) / (generated - 1))


def _configure_logging(level: str) -> None:
    """Our loggers print on the worker's stderr whatever BentoML did to the root logger."""
    package = logging.getLogger("openllm_clone")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.propagate = False
    package.setLevel(level)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread, awaited: a SIGTERM during a long model load ends the
    worker at once (``asyncio.to_thread``'s pool threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=run, name="openllm-clone-load", daemon=True).start()
    return await future


@bentoml.asgi_app(root_app, path="/", name="compat")
@bentoml.asgi_app(app, path="/v1")
@bentoml.service(name="openllm-clone", workers=1, traffic={"timeout": 3600})
class LLMService:
    """Serves one base model and its LoRA adapters."""

    def __init__(self) -> None:
        die_with_parent()  # a `start` killed with SIGKILL leaves no worker behind
        self.settings = Settings.from_env()
        _configure_logging(self.settings.log_level)
        readiness.starting("loading the model")
        self._startup: asyncio.Task[None] | None = None  # held: the loop keeps weak refs

    @bentoml.on_startup
    async def begin_loading(self) -> None:
        """Load the model and the start-up adapters in the background: the HTTP server
        answers meanwhile (``/readyz`` a 503 with the step it is at, the routes a 503)."""
        self._startup = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        from openllm_clone._memory import heap_trimmer
        from openllm_clone.llm import LLM
        from openllm_clone.runners.loader import warm_up

        settings = self.settings
        observer = PrometheusObserver(
            log_prompts=settings.log_prompts, tenancy=tenancy_for(settings)
        )
        try:
            try:
                llm = await _in_daemon_thread(
                    lambda: LLM.from_settings(settings, observer=observer, warmup=False)
                )
                if llm.runner.warmup_compiles():  # minutes: /readyz answers meanwhile
                    await _in_daemon_thread(lambda: warm_up(llm.runner))
                else:  # a load from the cache, on the loop's thread, which runs the steps
                    warm_up(llm.runner)
            except Exception as exc:
                raise ModelLoadError(f"cannot load the model: {one_line(exc)}") from exc
            observer.tokenizer = llm.tokenizer
            llm.engine.heap_trimmer = heap_trimmer()  # a long-running server: see _memory.py
            readiness.starting("loading the start-up adapters")
            await llm.start()
        except Exception as exc:
            # Never raised to BentoML, which would restart the worker again and again:
            # `start` (or `bentoml serve` of a bento) watches the fatal file and exits 1.
            reason = one_line(exc)
            logger.error("cannot start: %s", reason)
            readiness.failed(reason)
            report_fatal(reason)
            return
        _state["llm"] = llm
        readiness.ready()
        logger.info("openllm-clone serving %s", llm.name)

    async def __is_ready__(self) -> bool:
        """Ready once the model and the start-up adapters are loaded (never waits: the
        middleware answers /readyz with the reason until then)."""
        return readiness.is_ready


LLMService.add_asgi_middleware(GuardMiddleware)  # type: ignore[attr-defined]  # a bentoml.Service
