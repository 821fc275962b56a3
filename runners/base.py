"""The runner protocol: what the engine asks of whatever executes the model.

The engine schedules; the runner computes. One call to :meth:`ModelRunner.step`
runs one forward pass over a packed batch of rows, each row with its own adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ModelInfo", "ModelRunner", "StepRow"]


@dataclass
class StepRow:
    """One sequence's share of a step.

    ``token_ids`` are the tokens whose KV this step computes (a prompt chunk, or the
    last sampled token); ``start_pos`` is how many tokens of the sequence are
    already in the KV cache; ``block_table`` lists the KV blocks the sequence owns,
    enough for ``start_pos + len(token_ids)`` tokens.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    adapter_slot: int = 0
    need_logits: bool = True


@dataclass
class ModelInfo:
    """Static facts about the loaded base model."""

    model_id: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    num_parameters: int
    weight_bytes: int
    quantization: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelRunner(Protocol):
    """What the engine needs from a runner."""

    info: ModelInfo
    block_size: int
    num_blocks: int

    def step(self, rows: list[StepRow]) -> Any:
        """Run one forward; return fp32 logits, one row per row with ``need_logits``."""
        ...
