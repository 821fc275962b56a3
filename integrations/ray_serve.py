"""Ray Serve backend: the same HTTP API on N model replicas, routed by adapter.

``openllm-clone start MODEL --backend ray --replicas N`` deploys two Ray Serve
deployments:

``LLMReplica`` (N replicas, ``--cpus-per-replica`` each; :mod:`.ray_replica`)
    One :class:`~openllm_clone.llm.LLM` per replica, running the ordinary ``/v1`` app
    in-process; adapters held through ``@serve.multiplexed``.

``Router`` (one replica, no CPU reserved; this module)
    The HTTP ingress. It reads the adapter a request names (``adapter_name`` or
    OpenAI ``model``) and calls the replicas with ``multiplexed_model_id`` set to it:
    Ray Serve routes the call to a replica that already holds the adapter, unless those
    are at ``max_ongoing_requests`` (then the least loaded replica takes it and loads
    the adapter). ``--routing random`` drops the model id: the baseline that ignores
    adapters. Adapters loaded at run time (``POST /v1/adapters``) are kept in the
    router's table and travel with each request, so any replica can load them; an
    unload removes the name from the table at once and each replica frees it on its
    next request. A replica that dies mid-request turns into a 503 ``unavailable``
    (retryable) error; Ray starts a replacement.

Tests run Ray inside a loopback-only network namespace (Ray listens on every
interface); see ``tests/e2e/test_ray.py``.
"""

# No `from __future__ import annotations`: Ray pickles the Router by value, and FastAPI
# must see real classes (Request) in the route signatures, not strings.
import asyncio
import json
import logging
import os
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openllm_clone.adapters.shared import shared_adapters

from openllm_clone.errors import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    MissingDependencyError,
    ModelLoadError,
    OpenLLMCloneError,
    UnavailableError,
)
from openllm_clone.middleware import GuardMiddleware
from openllm_clone.settings import Settings
from openllm_clone.tenants import (
    current_entry,
    reload_marker,
    request_reload,
    tenancy_for,
)

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise MissingDependencyError.for_extra("ray[serve]", "ray") from exc

from .ray_replica import CACHE_HEADER, HOP_HEADERS, LOADED_HEADER, REPLICA_HEADER, LLMReplica

__all__ = ["LLMReplica", "Router", "build_application", "run"]

logger = logging.getLogger(__name__)

APP_NAME = "openllm-clone"


router_app = FastAPI(title="openllm-clone (Ray Serve)", version="0.1.0")
_router_settings: dict[str, Settings] = {}


def _guard_settings() -> Settings:
    return _router_settings["settings"]


def _set_router_settings(settings: Settings) -> None:
    # A function (pickled by reference), not the dict: Ray pickles the Router class by
    # value, which would copy a dict it referenced directly.
    _router_settings["settings"] = settings


# Ray freezes the app when the class is decorated, so the middleware goes on here and
# reads the settings the router replica was started with.
router_app.add_middleware(GuardMiddleware, settings=_guard_settings)


def _adapter_of(path: str, body: Any, base_names: set[str]) -> tuple[str | None, list[str]]:
    """The adapter a request names, and every adapter it needs (merges included)."""
    if not isinstance(body, dict):
        return None, []
    if path in ("/generate", "/generate_stream"):
        adapter = body.get("adapter_name")
    elif path in ("/completions", "/chat/completions", "/responses", "/embeddings"):
        adapter = body.get("model")
    else:
        return None, []
    if not isinstance(adapter, str) or not adapter or adapter in base_names:
        adapter = None
    merged = body.get("merged_adapters")
    ids = merged.get("ids") if isinstance(merged, dict) else None
    needed = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
    return adapter, [*([adapter] if adapter else []), *needed]


def _unavailable(exc: BaseException) -> JSONResponse:
    logger.warning("replica call failed: %s: %s", type(exc).__name__, exc)
    error = UnavailableError(
        f"the replica serving this request failed ({type(exc).__name__}); nothing was "
        "returned, retry the request",
        retry_after=1.0,
    )
    return JSONResponse(
        error.to_dict(), status_code=error.status_code, headers={"Retry-After": "1"}
    )


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(router_app)
class Router:
    """HTTP ingress: authentication, body limits, adapter-aware routing, run-time adapters."""

    def __init__(self, replicas: Any, settings_json: str) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        _set_router_settings(self.settings)
        self.replicas = replicas
        self.specs: dict[str, dict[str, Any]] = {}
        self.unloaded: dict[str, float] = {}
        self._base_names: set[str] | None = None
        self._startup: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self.by_replica: Counter[str] = Counter()
        self.loads: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.holding: dict[str, set[str]] = {}
        self.pids: dict[str, int] = {}
        # Run-time adapters outlive the router: the same file a BentoML server keeps.
        self.shared = shared_adapters(self.settings)
        if self.shared is not None:
            for name, entry in self.shared.entries().items():
                self.specs[name] = {"name": name, **entry}

    # --- forwarding ----------------------------------------------------------------------

    async def _describe(self) -> dict[str, Any]:
        info = await self.replicas.describe.remote()
        self._base_names = set(info["names"])
        self._startup = info["adapters"]
        return info

    def _route(self, adapter: str | None) -> Any:
        if adapter and self.settings.routing == "affinity":
            return self.replicas.options(stream=True, multiplexed_model_id=adapter)
        return self.replicas.options(stream=True)

    def _record(self, headers: dict[str, str], adapter: str | None) -> None:
        replica, _, pid = headers.pop(REPLICA_HEADER, "?").partition("@")
        if pid.isdigit():
            self.pids[replica] = int(pid)
        cache = headers.pop(CACHE_HEADER, None)
        loaded = headers.pop(LOADED_HEADER, None)
        self.by_replica[replica] += 1
        if loaded is not None:
            self.holding[replica] = {n for n in loaded.split(",") if n}
        if adapter and cache in ("hit", "miss"):
            self.stats[f"adapter_cache_{cache}"] += 1
            if cache == "miss":
                self.loads[adapter][replica] += 1

    async def _forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        if self._base_names is None:
            try:
                await self._describe()
            except Exception as exc:
                return _unavailable(exc)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None  # the replica answers the 400
        adapter, needed = _adapter_of(path, parsed, self._base_names or set())
        if adapter in self.unloaded and adapter not in self.specs:
            err = AdapterNotFoundError(f"adapter {adapter!r} was unloaded", param="model")
            return JSONResponse(err.to_dict(), status_code=err.status_code)
        tenant = current_entry()
        tenant_name = tenant.tenant if tenant is not None else None
        req = {
            "tenant": tenant.model_dump() if tenant is not None else None,
            "method": request.method,
            "path": path,
            "query": request.url.query.encode(),
            "headers": [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_HEADERS],
            "body": body,
            "adapter": adapter,
            "specs": {n: self.specs[n] for n in needed if n in self.specs},
            "unloaded": list(self.unloaded),
        }
        self.stats["requests"] += 1
        stream = self._route(adapter).handle.remote(req)
        try:
            start = await stream.__anext__()
        except Exception as exc:
            self.stats["unavailable"] += 1
            return _unavailable(exc)
        headers = dict(start["headers"])
        self._record(headers, adapter)
        status = "ok" if start["status"] < 400 else "error"
        if not start["streaming"]:
            try:
                parts = [chunk async for chunk in stream]
            except Exception as exc:
                self.stats["unavailable"] += 1
                return _unavailable(exc)
            for part in parts:
                if isinstance(part, dict):
                    self._meter(tenant_name, adapter, status, part["usage"])
            content = b"".join(p for p in parts if isinstance(p, bytes))
            return Response(content, status_code=start["status"], headers=headers)

        async def body_iter() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for chunk in stream:
                    if isinstance(chunk, dict):
                        self._meter(tenant_name, adapter, status, chunk["usage"])
                        continue
                    yield chunk
                finished = True
            except Exception as exc:
                # Tokens already went out: end the stream with an error event the
                # client library recognises as retryable.
                self.stats["unavailable"] += 1
                logger.warning("replica failed mid-stream: %s", exc)
                error = UnavailableError(
                    "the replica serving this stream failed; retry the request"
                )
                yield f"data: {json.dumps(error.to_dict())}\n\n".encode()
                finished = True
            finally:
                if not finished:
                    stream.cancel()  # the client went away: stop the replica's request

        return StreamingResponse(body_iter(), status_code=start["status"], headers=headers)

    def _meter(
        self, tenant: str | None, adapter: str | None, status: str, usage: list[int]
    ) -> None:
        """A forwarded request's tokens, as its replica counted them: usage per tenant
        and adapter (/v1/usage) and the tenant's tokens-per-minute."""
        tenancy = tenancy_for(self.settings)
        prompt, completion = usage
        tenancy.meter.record(tenant or "-", adapter, status, prompt, completion)
        if tenant is not None:
            tenancy.limiter.record_tokens(tenant, prompt + completion)

    async def record_usage(self, tenant: str | None, adapter: str | None, usage: list[int]) -> None:
        """A replica's report of a stream cancelled after its client went away (the
        stream itself can no longer carry it): counted as ``cancelled``."""
        self._meter(tenant, adapter, "cancelled", usage)

    # --- routes the router answers itself ------------------------------------------------------

    @router_app.get("/livez")
    async def livez(self) -> Response:
        return Response("ok")

    @router_app.get("/healthz")
    async def healthz(self) -> Response:
        return Response("ok")

    @router_app.get("/readyz")
    async def readyz(self) -> Response:
        try:
            await asyncio.wait_for(self._describe(), timeout=5)
        except Exception as exc:
            return Response(f"not ready: {type(exc).__name__}", status_code=503)
        return Response("ok")

    @router_app.get("/metrics")
    async def metrics(self) -> Response:
        lines = [
            "# TYPE openllm_clone_router_requests_total counter",
            f"openllm_clone_router_requests_total {self.stats['requests']}",
            "# TYPE openllm_clone_router_unavailable_total counter",
            f"openllm_clone_router_unavailable_total {self.stats['unavailable']}",
            "# TYPE openllm_clone_adapter_cache_requests_total counter",
        ]
        for result in ("hit", "miss"):
            lines.append(
                f'openllm_clone_adapter_cache_requests_total{{result="{result}"}} '
                f"{self.stats[f'adapter_cache_{result}']}"
            )
        lines.append("# TYPE openllm_clone_replica_requests_total counter")
        for replica, count in sorted(self.by_replica.items()):
            lines.append(f'openllm_clone_replica_requests_total{{replica="{replica}"}} {count}')
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def routing_stats(self) -> dict[str, Any]:
        hits, misses = self.stats["adapter_cache_hit"], self.stats["adapter_cache_miss"]
        return {
            "backend": "ray",
            "routing": self.settings.routing,
            "replicas": self.settings.replicas,
            "max_replicas": self.settings.max_replicas,
            "requests": self.stats["requests"],
            "unavailable": self.stats["unavailable"],
            "adapter_cache_hits": hits,
            "adapter_cache_misses": misses,
            "adapter_cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "requests_by_replica": dict(self.by_replica),
            "replica_pids": dict(self.pids),
            "adapter_loads": {a: dict(c) for a, c in self.loads.items()},
            "adapters_by_replica": {r: sorted(n) for r, n in self.holding.items()},
        }

    @router_app.get("/v1/metadata")
    async def metadata(self, request: Request) -> Response:
        response = await self._forward(request, "/metadata")
        if response.status_code != 200:
            return response
        data = json.loads(bytes(response.body))
        data["routing"] = self.routing_stats()
        return JSONResponse(data)

    def _adapter_list(self) -> list[dict[str, Any]]:
        listed: dict[str, dict[str, Any]] = {}
        for info in self._startup:
            listed[info["name"]] = dict(info)
        for name, spec in self.specs.items():
            listed[name] = {
                "name": name,
                "source": spec["source"],
                "pinned": spec.get("pinned", False),
            }
        for name in self.unloaded:
            if name not in self.specs:
                listed.pop(name, None)
        for name, info in listed.items():
            replicas = sorted(r for r, held in self.holding.items() if name in held)
            info["replicas"] = replicas
            info["state"] = "ready" if replicas else "registered"
        return [listed[n] for n in sorted(listed)]

    @router_app.get("/v1/adapters")
    async def list_adapters(self) -> Response:
        if self._base_names is None:
            try:
                await self._describe()
            except Exception as exc:
                return _unavailable(exc)
        return JSONResponse({"object": "list", "data": self._visible_adapters()})

    def _visible_adapters(self) -> list[dict[str, Any]]:
        """The adapters the request's key may use (every one without keys)."""
        entry = current_entry()
        return [a for a in self._adapter_list() if entry is None or entry.may_use(a["name"])]

    @router_app.get("/v1/usage")
    async def usage(self) -> Response:
        """Requests and tokens per tenant and adapter since the router started (the
        middleware lets only admin keys in when keys exist)."""
        return JSONResponse(tenancy_for(self.settings).meter.snapshot())

    @router_app.get("/v1/models")
    async def models(self) -> Response:
        try:
            info = await self._describe()
        except Exception as exc:
            return _unavailable(exc)
        created = int(time.time())
        entry = current_entry()
        data = []
        if entry is None or entry.base_model:
            data.append(
                {
                    "id": info["names"][0],
                    "object": "model",
                    "created": created,
                    "owned_by": "openllm-clone",
                    "root": info["names"][1],
                    "parent": None,
                }
            )
        data += [
            {
                "id": a["name"],
                "object": "model",
                "created": created,
                "owned_by": "openllm-clone",
                "root": a.get("source"),
                "parent": info["names"][0],
            }
            for a in self._visible_adapters()
        ]
        return JSONResponse({"object": "list", "data": data})

    @router_app.post("/v1/adapters")
    async def load_adapter(self, request: Request) -> Response:
        from openllm_clone.api import error_response, json_body, parse_body
        from openllm_clone.protocol import LoadAdapterRequest

        try:
            body = parse_body(LoadAdapterRequest, await json_body(request))
        except OpenLLMCloneError as exc:
            return error_response(exc)
        spec = {
            "name": body.name,
            "source": body.source,
            "pinned": body.pinned,
            "force": body.force,
        }
        current = self.specs.get(body.name) or next(
            (a for a in self._startup if a["name"] == body.name and body.name not in self.unloaded),
            None,
        )
        if current is not None and current["source"] != body.source:
            # The same fault answers the same error as a single server's registry.
            return error_response(
                AdapterIncompatibleError(
                    f"adapter {body.name!r} is already loaded from {current['source']!r}; unload it "
                    "first to load another source under that name"
                )
            )
        handle = (
            self.replicas.options(multiplexed_model_id=body.name)
            if self.settings.routing == "affinity"
            else self.replicas
        )
        try:
            answer = await handle.load_adapter.remote(spec)
        except Exception as exc:
            return _unavailable(exc)
        if answer["status"] == 200:
            # Known to the whole deployment from now on; other replicas load it on demand.
            self.specs[body.name] = spec
            if self.shared is not None:
                await asyncio.to_thread(
                    self.shared.put, body.name, body.source, pinned=body.pinned, force=body.force
                )
            self.unloaded.pop(body.name, None)
            self.loads[body.name][answer["body"].get("replica", "?")] += 1
        return JSONResponse(answer["body"], status_code=answer["status"])

    @router_app.delete("/v1/adapters/{name}")
    async def unload_adapter(self, name: str) -> Response:
        known = name in self.specs or any(a["name"] == name for a in self._startup)
        if not known or name in self.unloaded:
            from openllm_clone.api import error_response

            return error_response(AdapterNotFoundError(f"adapter {name!r} is not loaded"))
        self.specs.pop(name, None)
        self.unloaded[name] = time.time()
        if self.shared is not None:
            await asyncio.to_thread(self.shared.remove, name)
        # Replicas free it on their next request (in-flight requests finish first).
        return JSONResponse({"name": name, "deleted": True})

    @router_app.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def forward(self, path: str, request: Request) -> Response:
        return await self._forward(request, "/" + path)


def build_application(settings: Settings) -> Any:
    """The Ray Serve application: the router in front of ``settings.replicas`` replicas."""
    settings_json = settings.model_dump_json()
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": settings.cpus_per_replica,
            "num_gpus": settings.gpus_per_replica,
        },
        # Enough in flight per replica to fill its running batch and queue; beyond it
        # Ray sends the request to another replica even if that one lacks the adapter.
        "max_ongoing_requests": settings.max_batch_size * 4,
    }
    if settings.max_replicas and settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "initial_replicas": settings.replicas,
            "target_ongoing_requests": settings.max_batch_size,
        }
    else:
        options["num_replicas"] = settings.replicas
    # Ray Serve's decorators make these deployments (mypy sees the classes).
    replicas = LLMReplica.options(**options).bind(settings_json)  # type: ignore[attr-defined]
    return Router.bind(replicas, settings_json)  # type: ignore[attr-defined]


def _deployment_errors() -> str:
    """What Serve says of the application's deployments (a failed replica's traceback)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - the controller may be gone: the caller has a message
        return ""
    if app is None:
        return ""
    return "\n".join(d.message for d in app.deployments.values() if d.message)


def _last_error(message: str) -> str:
    """The last ``SomeError: reason`` line of a deployment failure's message (Ray puts
    the replica's whole traceback in it), without the type; the message's first line when
    there is none."""
    found = re.findall(r"^\s*[\w.]*(?:Error|Exception): (.+)$", message, re.MULTILINE)
    return found[-1].strip() if found else message.strip().splitlines()[0]


def run(settings: Settings, *, block: bool = True) -> None:
    """Start (or join) Ray, deploy the application on ``host:port``, serve until Ctrl-C."""
    import ray

    if settings.keys_file:  # before Ray starts: its processes inherit the marker's name
        reload_marker(create=True)
    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, namespace=APP_NAME, log_to_driver=False)
        else:
            needed = settings.cpus_per_replica * (settings.max_replicas or settings.replicas)
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                namespace=APP_NAME,
                include_dashboard=False,
                object_store_memory=256 * 2**20,
                log_to_driver=False,
                runtime_env={
                    "env_vars": {
                        k: v
                        for k, v in os.environ.items()
                        if k.startswith(("BENTOML_", "HF_", "OPENLLM_CLONE_"))
                    }
                },
            )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # a replica that cannot start, after Ray's retries
        detail = _deployment_errors() or str(exc)
        serve.shutdown()
        ray.shutdown()
        raise ModelLoadError(f"the Ray deployment failed: {_last_error(detail)}") from exc
    if not block:
        return
    keys_file = settings.keys_file
    if keys_file:  # SIGHUP: the router re-reads the keys file (see openllm_clone.tenants)
        signal.signal(signal.SIGHUP, lambda *_: request_reload(keys_file))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
