"""The engine's limits and its metrics hooks: no torch, so that the BentoML service module
(imported by ``openllm-clone start`` before the worker loads a model) stays light."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import RequestGroup

__all__ = ["EngineConfig", "EngineObserver"]


@dataclass
class EngineConfig:
    """Scheduling limits."""

    max_batch_size: int = 16
    max_queue: int = 256
    max_prefill_tokens: int = 512
    seed: int = 0
    prefix_caching: bool = True
    fair: bool = False  # admit waiting requests by tenant fairness instead of arrival


class EngineObserver:
    """Hooks for metrics; the default does nothing. Called from the engine thread."""

    def on_step(self, running: int, waiting: int, kv_used: int, kv_total: int) -> None:
        """After every step."""

    def on_first_token(self, group: RequestGroup, ttft: float) -> None:
        """When a request's first token is out."""

    def on_finished(self, group: RequestGroup, status: str, latency: float) -> None:
        """When a request ends (``status`` is ok, cancelled or error)."""

    def on_fault_isolated(self, rows: int) -> None:
        """A batched forward raised and ``rows`` rows were found to fail on their own."""
