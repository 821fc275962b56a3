"""The adapter registry: names, states, slots, LRU eviction, pinning, one load lock per name.

Two tiers, as in vLLM: a *registered* adapter is known by name and source; a
*ready* one sits in a runner slot and can serve. Requests name adapters, never
slots. Loading reads and validates files in a worker thread, then installs the
weights between two engine steps, so other streams never pause for longer than a
step. A failed load leaves the registry as it was.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from openllm_clone.engine.sequence import AdapterRef
from openllm_clone.errors import (
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    CapacityError,
    OpenLLMCloneError,
)
from openllm_clone.protocol import AdapterInfo

from .merge import MERGE_PREFIX, merge, merge_name, parse_merge
from .source import resolve_adapter_source
from .weights import AdapterWeights, read_adapter

if TYPE_CHECKING:
    from .shared import SharedAdapters

__all__ = ["AdapterHost", "AdapterRecord", "AdapterRegistry"]

logger = logging.getLogger(__name__)


class AdapterHost(Protocol):
    """What the registry needs from the runner side."""

    def validate(self, weights: AdapterWeights) -> None:
        """Raise AdapterIncompatibleError unless the weights fit the base model."""

    async def install(self, slot: int, weights: AdapterWeights) -> None:
        """Put weights in a slot between steps."""

    async def remove(self, slot: int) -> None:
        """Empty a slot between steps."""


@dataclass
class AdapterRecord:
    """One adapter known to the server."""

    name: str
    source: str
    pinned: bool = False
    state: str = "registered"  # registered | ready | failed (its last load, with error)
    slot: int = 0
    in_use: int = 0
    requests_served: int = 0
    last_used: float = 0.0
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    size_bytes: int | None = None
    base_model: str | None = None
    kind: str | None = None  # lora, or merge (its strategy); set when its weights are read
    error: str | None = None
    unloading: bool = False
    force: bool = False  # skip the base-model check when it loads (start-up adapters)
    shared: bool = False  # listed in the server's run-time adapter file (every worker)
    load: int = 0  # which load this is (the registry counts them): prefix-cache keys use it

    def info(self) -> AdapterInfo:
        """Public view for ``GET /v1/adapters``."""
        return AdapterInfo(
            name=self.name,
            source=self.source,
            state=self.state,  # type: ignore[arg-type]
            rank=self.rank,
            alpha=self.alpha,
            target_modules=list(self.target_modules),
            size_bytes=self.size_bytes,
            pinned=self.pinned,
            requests_served=self.requests_served,
            base_model=self.base_model,
            kind=self.kind,
            error=self.error,
        )


def _in_store(name: str) -> bool:
    """True when ``name`` is an adapter in the BentoML model store."""
    from .source import _from_store

    return _from_store(name) is not None


def _same_model(a: str, b: str) -> bool:
    norm = [x.rstrip("/").lower() for x in (a, b)]
    return norm[0] == norm[1] or norm[0].split("/")[-1] == norm[1].split("/")[-1]


class AdapterRegistry:
    """Tracks adapters and the runner slots they occupy."""

    def __init__(
        self,
        host: AdapterHost,
        *,
        max_loaded: int,
        base_model_aliases: builtins.list[str],
        roots: builtins.list[str] | None = None,
        allow_pickle: bool = False,
        load_timeout: float = 60.0,
        max_bytes: int | None = None,
        reader: Callable[..., AdapterWeights] = read_adapter,
        shared: SharedAdapters | None = None,
    ) -> None:
        self.host = host
        self.max_loaded = max_loaded
        self.base_model_aliases = [a for a in base_model_aliases if a]
        self.roots = roots or []
        self.allow_pickle = allow_pickle
        self.load_timeout = load_timeout
        self._reader = reader
        self.max_bytes = max_bytes
        self.shared = shared  # run-time adapters of every worker (POST /v1/adapters)
        self._records: dict[str, AdapterRecord] = {}
        self._free_slots = list(range(max_loaded, 0, -1))
        self._loads = 0  # loads so far: each install gets the next number
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._slots_changed = asyncio.Condition()
        # Adapter cache statistics: a request whose adapter was ready is a hit; one that
        # had to load it first is a miss.
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # --- queries -------------------------------------------------------------------------

    def list(self) -> builtins.list[AdapterInfo]:
        """Every known adapter."""
        self.sync()
        return [
            r.info()
            for r in sorted(self._records.values(), key=lambda r: r.name)
            if not r.unloading
        ]

    def get(self, name: str) -> AdapterRecord | None:
        """The record of ``name``, if known."""
        self.sync()
        return self._records.get(name)

    def names(self) -> builtins.list[str]:
        """Names of all known adapters."""
        self.sync()
        return sorted(n for n, r in self._records.items() if not r.unloading)

    def sync(self) -> None:
        """Follow the shared run-time adapter file: register what another worker (or an
        earlier run) added, and unload, after their requests, what was deleted."""
        if self.shared is None:
            return
        entries = self.shared.entries()
        for name, entry in entries.items():
            record = self._records.get(name)
            if record is None:
                record = self.register(
                    name,
                    entry["source"],
                    pinned=entry.get("pinned", False),
                    force=entry.get("force", False),
                )
                record.shared = True
        for name, record in list(self._records.items()):
            listed = entries.get(name)
            gone = listed is None or listed["source"] != record.source
            if record.shared and gone and not record.unloading:
                record.unloading = True  # new requests see it missing from now on
                with contextlib.suppress(RuntimeError):  # no loop: nothing is running
                    asyncio.get_running_loop().create_task(self._forget(name))

    async def _forget(self, name: str) -> None:
        try:
            await self.unload(name)
        except OpenLLMCloneError as exc:
            logger.warning("could not unload %s (deleted on another worker): %s", name, exc)
        self.sync()  # re-registered under the same name with another source?

    async def add(
        self, name: str, source: str, *, pinned: bool = False, force: bool = False
    ) -> AdapterRecord:
        """``POST /v1/adapters``: load here, then record it for every worker (nothing is
        recorded when the load fails)."""
        record = await self.load(name, source, pinned=pinned, force=force)
        if self.shared is not None:
            await asyncio.to_thread(
                self.shared.put, name, record.source, pinned=pinned, force=force
            )
            record.shared = True
        return record

    async def delete(self, name: str) -> None:
        """``DELETE /v1/adapters/{name}``: forget it everywhere (each worker unloads it once
        its requests finish)."""
        removed = False
        if self.shared is not None:
            removed = await asyncio.to_thread(self.shared.remove, name)
        record = self._records.get(name)
        if record is None and not removed:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if record is not None:
            await self.unload(name)

    def loaded(self) -> builtins.list[str]:
        """Names of the adapters whose weights are in a slot now."""
        return sorted(n for n, r in self._records.items() if r.state == "ready")

    def cache_stats(self) -> dict[str, float]:
        """Hits, misses, evictions and the hit rate of the adapter cache."""
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": round(self.hits / total, 4) if total else 0.0,
        }

    # --- loading -------------------------------------------------------------------------

    def register(
        self, name: str, source: str, *, pinned: bool = False, force: bool = False
    ) -> AdapterRecord:
        """Know an adapter by name without loading it (loaded on first use)."""
        record = self._records.get(name)
        if record is not None and record.source != source:
            raise AdapterIncompatibleError(
                f"adapter {name!r} is already registered with source {record.source!r}"
            )
        if record is None:
            record = AdapterRecord(name=name, source=source, pinned=pinned, force=force)
            self._records[name] = record
        return record

    async def load(
        self, name: str, source: str | None = None, *, pinned: bool = False, force: bool = False
    ) -> AdapterRecord:
        """Load (or re-load after eviction) an adapter into a slot; idempotent when ready."""
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            existing = self._records.get(name)
            if existing is not None and source is not None and existing.source != source:
                raise AdapterIncompatibleError(
                    f"adapter {name!r} is already loaded from {existing.source!r}; "
                    "unload it first to load another source under that name"
                )
            if existing is not None and existing.state == "ready":
                existing.pinned = existing.pinned or pinned
                return existing
            src = source or (existing.source if existing else None)
            if src is None:
                raise AdapterNotFoundError(
                    f"adapter {name!r} is not loaded and has no known source"
                )
            started = time.perf_counter()
            weights = await self._servable(existing, src, force=force)
            slot = await self._take_slot()
            try:
                await self.host.install(slot, weights)
            except BaseException:
                self._give_back(slot)
                raise
            if existing is not None and self._records.get(name) is not existing:
                # Unloaded while it loaded (a load without a request, like Ray's multiplex
                # hold, is not counted in in_use): it must not come back.
                self._give_back(slot)
                async with self._slots_changed:
                    self._slots_changed.notify_all()
                raise AdapterNotFoundError(f"adapter {name!r} was unloaded while it loaded")
            record = existing or AdapterRecord(name=name, source=src)
            record.source = src
            record.pinned = record.pinned or pinned
            record.slot = slot
            self._loads += 1
            record.load = self._loads
            record.state = "ready"
            record.error = None
            record.rank = weights.rank
            record.alpha = weights.alpha
            record.target_modules = tuple(weights.target_modules)
            record.size_bytes = weights.size_bytes
            record.base_model = weights.base_model
            record.kind = weights.kind
            record.last_used = time.monotonic()
            self._records[name] = record
            logger.info(
                "adapter %s ready in slot %d (rank %d, %.0f ms)",
                name,
                slot,
                weights.rank,
                1000 * (time.perf_counter() - started),
            )
            return record

    async def check(self, name: str) -> None:
        """Read and validate a registered adapter as its load would, without taking a slot
        (start-up adapters that load on first use); raises what the load would raise."""
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not registered")
        if record.state != "ready":
            await self._servable(record, record.source, force=False)

    async def _servable(
        self, record: AdapterRecord | None, source: str, *, force: bool
    ) -> AdapterWeights:
        """The weights of ``source``, read and checked against the base model and the
        runner; a refusal marks ``record`` failed with the reason (``/v1/adapters``) until a
        later load succeeds."""
        try:
            if source.startswith(MERGE_PREFIX):
                weights = await self._read_merge(source)
            else:
                weights = await self._read(source)
                self._check_base(weights, force=force or (record is not None and record.force))
            self.host.validate(weights)
        except AdapterError as exc:
            if record is not None and record.state != "ready":
                record.state, record.error = "failed", exc.message
            raise
        return weights

    async def _read(self, source: str) -> AdapterWeights:
        path = await asyncio.to_thread(resolve_adapter_source, source, roots=self.roots)
        return await asyncio.to_thread(
            self._reader, path, allow_pickle=self.allow_pickle, max_bytes=self.max_bytes
        )

    async def _read_merge(self, name: str) -> AdapterWeights:
        recipe = parse_merge(name)
        components = []
        for part, coeff in recipe.parts:
            record = self._records.get(part)
            if record is None or record.source.startswith(MERGE_PREFIX):
                raise AdapterNotFoundError(
                    f"merged_adapters names {part!r}, which is not a loaded adapter",
                    param="merged_adapters",
                )
            components.append((await self._read(record.source), coeff))
        return merge(components, recipe, path=name)

    async def merged(
        self,
        names: builtins.list[str],
        weights: builtins.list[float],
        *,
        strategy: str = "linear",
        density: float | None = None,
        majority_sign_method: str | None = None,
    ) -> str:
        """Register (once) the merge of ``names`` (``strategy``: see
        :mod:`~openllm_clone.adapters.merge`); return its adapter name."""
        name = merge_name(
            names,
            weights,
            strategy=strategy,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        for component in names:
            if component not in self._records or component.startswith(MERGE_PREFIX):
                raise AdapterNotFoundError(
                    f"merged_adapters names {component!r}, which is not a loaded adapter",
                    param="merged_adapters",
                )
        if name not in self._records:
            self.register(name, name)
        return name

    def _check_base(self, weights: AdapterWeights, *, force: bool) -> None:
        base = weights.base_model
        if force or base is None or not self.base_model_aliases:
            return
        if not any(_same_model(base, alias) for alias in self.base_model_aliases):
            raise AdapterIncompatibleError(
                f"adapter was trained on {base!r}, not on this server's base model "
                f"({self.base_model_aliases[0]!r}); pass force=true to load it anyway"
            )

    async def _take_slot(self) -> int:
        deadline = time.monotonic() + self.load_timeout
        async with self._slots_changed:
            while True:
                if self._free_slots:
                    return self._free_slots.pop()
                victim = self._lru_victim()
                if victim is not None:
                    await self._evict(victim)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CapacityError(
                        f"all {self.max_loaded} adapter slots are busy or pinned "
                        "(raise --max-adapters)",
                        retry_after=2.0,
                    )
                try:
                    await asyncio.wait_for(self._slots_changed.wait(), timeout=remaining)
                except TimeoutError:
                    continue

    def _lru_victim(self) -> AdapterRecord | None:
        candidates = [
            r
            for r in self._records.values()
            if r.state == "ready" and not r.pinned and r.in_use == 0
        ]
        return min(candidates, key=lambda r: r.last_used, default=None)

    async def _empty(self, record: AdapterRecord) -> int:
        """Take a ready record out of its slot and free the slot; 0 when it held none.
        The state changes before the step-gap await, so that a second caller (two unloads
        of one name, an eviction racing an unload) never frees the slot again."""
        if record.state != "ready" or record.slot == 0:
            return 0
        slot = record.slot
        record.state = "registered"
        record.slot = 0
        try:
            await self.host.remove(slot)
        finally:
            self._give_back(slot)
        return slot

    def _give_back(self, slot: int) -> None:
        if slot in self._free_slots:
            # Freed twice, it would be handed to two adapters, and one would serve with the
            # other's weights (a bookkeeping bug: logged loudly, never acted on).
            logger.error("adapter slot %d freed twice; ignored", slot)
            return
        self._free_slots.append(slot)

    async def _evict(self, record: AdapterRecord) -> None:
        slot = await self._empty(record)
        self.evictions += 1
        logger.info("adapter %s evicted from slot %d (LRU)", record.name, slot)

    async def evict(self, name: str) -> bool:
        """Free ``name``'s slot now if it is idle and not pinned (it stays registered and
        loads again on its next request); False when it cannot be evicted."""
        async with self._slots_changed:
            # Checked under the lock: a request may take the slot while evict waits for it
            # (another load holds the lock while its step-gap call runs).
            record = self._records.get(name)
            if record is None or record.state != "ready" or record.pinned or record.in_use:
                return False
            await self._evict(record)
            self._slots_changed.notify_all()
        return True

    async def _known(self, name: str) -> AdapterRecord | None:
        self.sync()
        record = self._records.get(name)
        if record is None and await asyncio.to_thread(_in_store, name):
            # LoRAX-style just-in-time loading: an adapter imported into the model store
            # (`openllm-clone import --adapter`) is served by name, by every worker.
            record = self.register(name, name)
        return record

    async def ensure(self, name: str) -> AdapterRecord:
        """Load ``name`` if it is known (registered or in the model store) and not ready."""
        record = await self._known(name)
        if record is None or record.unloading:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="adapter_name")
        return await self.load(name)

    # --- serving -------------------------------------------------------------------------

    async def acquire(self, name: str) -> AdapterRef:
        """The adapter (slot, load) for a request naming ``name``, loading it on demand;
        pair with release."""
        record = await self._known(name)
        if record is None or record.unloading:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="adapter_name")
        # Count the request before any await so that eviction cannot take the slot.
        record.in_use += 1
        try:
            if record.state != "ready":
                self.misses += 1
                await self.load(name)
            else:
                self.hits += 1
        except BaseException:
            await self._release(record)
            raise
        record.requests_served += 1
        record.last_used = time.monotonic()
        return AdapterRef(name, record.slot, record.load)

    async def release(self, name: str) -> None:
        """The request naming ``name`` is over."""
        record = self._records.get(name)
        if record is not None:
            await self._release(record)

    async def _release(self, record: AdapterRecord) -> None:
        record.in_use = max(0, record.in_use - 1)
        async with self._slots_changed:
            self._slots_changed.notify_all()

    async def unload(self, name: str, *, timeout: float = 600.0) -> None:
        """Forget an adapter after its in-flight requests finish."""
        record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        record.unloading = True
        deadline = time.monotonic() + timeout
        async with self._slots_changed:
            while record.in_use > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    record.unloading = False
                    raise OpenLLMCloneError(f"adapter {name!r} is still in use; unload timed out")
                try:
                    await asyncio.wait_for(self._slots_changed.wait(), timeout=remaining)
                except TimeoutError:
                    continue
            await self._empty(record)  # nothing left to free when another unload ran first
            if self._records.get(name) is record:
                self._records.pop(name)
            self._slots_changed.notify_all()


class EngineAdapterHost:
    """Connects the registry to a runner's LoRA bank through the engine's step gap."""

    def __init__(
        self, runner: Any, call: Callable[[Callable[[], Any]], Awaitable[Any]], max_rank: int
    ) -> None:
        self.runner = runner
        self.call = call
        self.max_rank = max_rank

    def validate(self, weights: AdapterWeights) -> None:
        """Check rank, modules and shapes against the runner."""
        parts = (
            len(weights.config.get("merge", "").split("+")) if weights.config.get("merge") else 1
        )
        self.runner.lora.validate(weights, max_rank=self.max_rank * parts)

    async def install(self, slot: int, weights: AdapterWeights) -> None:
        """Copy weights into the bank between two steps."""
        await self.call(lambda: self.runner.lora.install(slot, weights))

    async def remove(self, slot: int) -> None:
        """Zero a slot between two steps."""
        await self.call(lambda: self.runner.lora.clear(slot))
