"""The model side of the Ray Serve backend: one :class:`LLMReplica` per Ray replica.

Each replica holds one :class:`~openllm_clone.llm.LLM` (engine, runner and its own LRU of
adapters) and runs the ordinary ``/v1`` FastAPI app in-process for the requests the
router (:mod:`openllm_clone.integrations.ray_serve`) forwards, streaming the ASGI
messages back, so every route behaves exactly as on the BentoML backend. Adapters are
held through ``@serve.multiplexed``: Ray then knows which replica holds which adapter,
and its LRU (``--max-adapters`` per replica) decides evictions.

Nothing here imports torch at module level: the router imports this module too.
"""

# No `from __future__ import annotations`: Ray builds the deployment from this class.
import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from openllm_clone.engine.config import EngineObserver
from openllm_clone.engine.sequence import RequestGroup
from openllm_clone.errors import MissingDependencyError, OpenLLMCloneError
from openllm_clone.settings import Settings
from openllm_clone.tenants import KeyEntry, current_tenant, usage_sink

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise MissingDependencyError.for_extra("ray[serve]", "ray") from exc

__all__ = ["CACHE_HEADER", "HOP_HEADERS", "LOADED_HEADER", "REPLICA_HEADER", "LLMReplica"]

logger = logging.getLogger(__name__)

# What a replica tells the router about itself in each answer (the router strips them).
REPLICA_HEADER = "x-openllm-replica"
CACHE_HEADER = "x-openllm-adapter-cache"
LOADED_HEADER = "x-openllm-adapters-loaded"
HOP_HEADERS = {b"host", b"content-length", b"transfer-encoding", b"connection"}


def _error_message(exc: OpenLLMCloneError) -> dict[str, Any]:
    """The API's own error response (status, JSON body, Retry-After...) as plain parts."""
    from openllm_clone.api import error_response

    response = error_response(exc)
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    return {"status": response.status_code, "headers": headers, "body": bytes(response.body)}


async def _call_asgi(
    app: Any,
    req: dict[str, Any],
    extra_headers: dict[str, str],
    tenant: KeyEntry | None = None,
    usage: list[tuple[int, int]] | None = None,
) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app in this process, as ``tenant`` (the key the
    router authenticated), collecting the token counts of its engine requests in ``usage``.

    Yields the response start as ``{"status", "headers", "streaming"}``, then body
    chunks (bytes). Closing the iterator early (the client went away) tells the app
    the client disconnected and cancels it, which aborts the engine request.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req["method"],
        "scheme": "http",
        "path": req["path"],
        "raw_path": req["path"].encode(),
        "query_string": req.get("query", b""),
        "root_path": "",
        "headers": req.get("headers", []),
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    messages: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.get("body", b""), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        current_tenant.set(tenant)  # this task's own context
        usage_sink.set(usage)
        try:
            await app(scope, receive, send)
            await messages.put(None)
        except BaseException as exc:  # surfaced to the caller below
            await messages.put(exc)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await messages.get()
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.response.start":
                headers = {
                    k.decode("latin-1"): v.decode("latin-1")
                    for k, v in message["headers"]
                    if k.lower() not in HOP_HEADERS
                }
                headers.update(extra_headers)
                streaming = headers.get("content-type", "").startswith("text/event-stream")
                yield {"status": message["status"], "headers": headers, "streaming": streaming}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()


class _CancelledUsage(EngineObserver):
    """A stream the router cancelled (its client went away) can no longer carry its token
    counts back; when the engine ends such a request, they go to the router's meter and
    token limits by a call of their own (counted as cancelled, as on a single server)."""

    def __init__(self) -> None:
        self._router: Any = None
        self._reports: set[asyncio.Task[None]] = set()  # calls in flight, kept referenced

    def on_finished(self, group: RequestGroup, status: str, latency: float) -> None:
        if status != "cancelled":
            return
        usage = [len(group.prompt_ids), group.completion_tokens()]
        # The engine runs on the replica's event loop: the call goes out from there.
        task = asyncio.get_running_loop().create_task(
            self._report(group.tenant, group.adapter_name, usage)
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, tenant: str | None, adapter: str | None, usage: list[int]) -> None:
        try:
            if self._router is None:
                app_name = serve.get_replica_context().app_name
                self._router = serve.get_deployment_handle("Router", app_name=app_name)
            await self._router.record_usage.remote(tenant, adapter, usage)
        except Exception as exc:  # the router is gone: nothing left to meter for
            logger.warning("could not report a cancelled request's tokens: %s", exc)


class _HeldAdapter:
    """What ``@serve.multiplexed`` caches per adapter; Ray calls ``__del__`` on eviction."""

    def __init__(self, replica: "LLMReplica", name: str) -> None:
        self.replica = replica
        self.name = name
        self.released = False

    def __del__(self) -> None:
        # Ray runs this in a thread pool when its LRU drops the adapter: free the slot on
        # the replica's loop (the registry keeps the adapter registered for later loads).
        if self.released:
            return
        self.released = True
        loop = self.replica.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(
                lambda: loop.create_task(self.replica.llm.adapters.evict(self.name))
            )


@serve.deployment(
    name="LLMReplica",
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=5,
)
class LLMReplica:
    """One engine with its adapters; runs the ``/v1`` app for requests the router sends."""

    def __init__(self, settings_json: str) -> None:
        from openllm_clone._memory import heap_trimmer
        from openllm_clone.api import build_app
        from openllm_clone.llm import LLM

        settings = Settings.model_validate_json(settings_json)
        logging.getLogger("openllm_clone").setLevel(settings.log_level)
        self.settings = settings
        self.llm = LLM.from_settings(settings, observer=_CancelledUsage())
        # Adapters named at start that cannot be served fail the replica here, so that the
        # deployment (and `start`) fails with the reason; the pinned ones load on the first
        # request, the others on theirs. Reading needs no engine: a loop of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self.llm.check_adapters()).result()
        self.llm.engine.heap_trimmer = heap_trimmer()  # a long-running server: see _memory.py
        self.app = build_app(lambda: self.llm)
        context = serve.get_replica_context()
        self.replica_id = f"{context.replica_id.unique_id}"
        self.pid = os.getpid()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._unloaded: set[str] = set()

        async def hold(name: str) -> _HeldAdapter:  # a plain function: Ray caches on it
            return await self._load(name)

        self._hold = serve.multiplexed(max_num_models_per_replica=settings.max_adapters)(hold)
        self._hold_key = hold  # where Ray keeps its cache of held adapters
        logger.info("replica %s (pid %d) serving %s", self.replica_id, self.pid, self.llm.name)

    async def _load(self, name: str) -> "_HeldAdapter":
        await self.llm.adapters.ensure(name)
        return _HeldAdapter(self, name)

    async def _prepare(self, req: dict[str, Any]) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            await self.llm.start(eager=False)
        registry = self.llm.adapters
        for name in req.get("unloaded", ()):
            # Unloaded on the router: forget it here too (after its requests finish).
            if name not in self._unloaded and registry.get(name) is not None:
                self._unloaded.add(name)
                asyncio.get_running_loop().create_task(self._forget(name))
        for name, spec in (req.get("specs") or {}).items():
            record = registry.get(name)
            if record is not None and record.source != spec["source"] and not record.in_use:
                self._drop_held(name)
                await registry.unload(name)  # replaced under the same name
            if registry.get(name) is None:
                registry.register(
                    name,
                    spec["source"],
                    pinned=spec.get("pinned", False),
                    force=spec.get("force", False),
                )
            self._unloaded.discard(name)

    async def _forget(self, name: str) -> None:
        self._drop_held(name)
        try:
            await self.llm.adapters.unload(name)
        except OpenLLMCloneError as exc:
            logger.warning("could not unload %s: %s", name, exc)

    def _drop_held(self, name: str) -> None:
        """Take an unloaded adapter out of Ray's multiplex cache: left there, it would
        keep one of the replica's ``max_adapters`` places, and every adapter beyond the
        rest would evict another on each request (Ray has no public call for this; when
        its internals differ, the entry ages out of its LRU instead)."""
        wrapper = getattr(self._hold_key, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        if isinstance(models, dict):
            held = models.pop(name, None)
            if isinstance(held, _HeldAdapter):
                held.released = True  # the registry unloads it; nothing to evict
            with contextlib.suppress(AttributeError):
                wrapper._push_multiplexed_replica_info = True  # type: ignore[union-attr]

    async def handle(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        """Serve one HTTP request (forwarded by the router); yields ASGI response parts."""
        await self._prepare(req)
        adapter = req.get("adapter")
        tenant = KeyEntry.model_validate(req["tenant"]) if req.get("tenant") else None
        extra = {REPLICA_HEADER: f"{self.replica_id}@{self.pid}"}
        if adapter and tenant is not None and not self.llm.visible_to(tenant, adapter):
            adapter = None  # out of scope: the route answers as for a missing adapter
        if adapter:
            record = self.llm.adapters.get(adapter)
            extra[CACHE_HEADER] = (
                "hit" if record is not None and record.state == "ready" else "miss"
            )
            try:
                await self._hold(adapter)
            except OpenLLMCloneError as exc:
                extra[LOADED_HEADER] = ",".join(self.llm.adapters.loaded())
                message = _error_message(exc)
                yield {
                    "status": message["status"],
                    "headers": {**message["headers"], **extra},
                    "streaming": False,
                }
                yield message["body"]
                return
        extra[LOADED_HEADER] = ",".join(self.llm.adapters.loaded())
        usage: list[tuple[int, int]] = []
        async for part in _call_asgi(self.app, req, extra, tenant, usage):
            yield part
        if usage:  # for the router's meter and token limits; never sent to the client
            yield {"usage": [sum(p for p, _ in usage), sum(c for _, c in usage)]}

    async def load_adapter(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Load an adapter here (the router picked this replica for it); returns
        ``{"status", "body"}`` like an HTTP answer."""
        await self._prepare({})
        registry = self.llm.adapters
        try:
            record = await registry.load(
                spec["name"],
                spec["source"],
                pinned=spec.get("pinned", False),
                force=spec.get("force", False),
            )
            await self._hold(spec["name"])
        except OpenLLMCloneError as exc:
            return {"status": exc.status_code, "body": exc.to_dict()}
        self._unloaded.discard(spec["name"])
        return {"status": 200, "body": {**record.info().model_dump(), "replica": self.replica_id}}

    async def describe(self) -> dict[str, Any]:
        """Names the base model answers to, the start-up adapters, and this replica."""
        await self._prepare({})
        return {
            "names": self.llm.base_names(),
            "adapters": [a.model_dump() for a in self.llm.adapters.list()],
            "replica": self.replica_id,
            "pid": self.pid,
        }

    async def check_health(self) -> None:
        """Ray's health check: the engine must not have failed."""
        if getattr(self.llm.engine, "failed", None):
            raise RuntimeError("engine failed")
