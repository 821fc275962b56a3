"""Sequences (one per sample) and the request groups they belong to.

What a request streams back (:class:`RequestOutput`, :class:`SeqDelta`,
:class:`TokenLogprob`) lives with the other schemas in :mod:`openllm_clone.protocol`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openllm_clone.protocol import RequestOutput, SamplingParams, SeqDelta, TokenLogprob

if TYPE_CHECKING:
    import torch

from .detokenizer import IncrementalDetokenizer, StopStringMatcher

__all__ = ["RequestGroup", "RequestOutput", "SeqDelta", "SeqStatus", "Sequence", "TokenLogprob"]


class SeqStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestGroup:
    """A request: one prompt, ``n`` sequences, one output queue."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    adapter_slot: int
    queue: asyncio.Queue[RequestOutput]
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    seqs: list[Sequence] = field(default_factory=list)
    cancelled: bool = False
    forked: bool = False
    constraint: Any = None  # a structured.Constraint: every sequence gets a matcher
    deadline: float | None = None  # perf_counter time after which the request is failed
    adapter_key: Any = None  # (slot, load generation) of the adapter: part of prefix-cache keys
    prompt_lp: list[TokenLogprob] = field(default_factory=list)  # for prompt tokens 1, 2, ...
    prompt_lp_sent: bool = False
    tenant: str | None = None  # whose key sent it (fair scheduling, metering, token limits)
    weight: float = 1.0  # the tenant's share of the engine under fair scheduling

    @property
    def wants_prompt_logits(self) -> bool:
        """True while prompt logprobs are asked for and not all computed yet."""
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_lp) < len(self.prompt_ids) - 1
        )

    @property
    def finished(self) -> bool:
        """True when every sequence has finished."""
        return bool(self.seqs) and all(s.status is SeqStatus.FINISHED for s in self.seqs)

    def completion_tokens(self) -> int:
        """Generated tokens over all sequences."""
        return sum(len(s.output_ids) for s in self.seqs)


class Sequence:
    """One sample being generated: its tokens, KV blocks, detokenizer and stop state."""

    def __init__(
        self,
        group: RequestGroup,
        index: int,
        tokenizer: Any,
        generator: torch.Generator | None,
    ) -> None:
        self.group = group
        self.index = index
        self.output_ids: list[int] = []
        self.block_table: list[int] = []
        self.num_cached = 0  # tokens whose KV is in the cache
        self.block_hashes: list[int] = []  # prefix-cache keys of the full blocks so far
        self.num_registered = 0  # leading blocks recorded in the prefix cache
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None
        self.generator = generator
        self.detok = IncrementalDetokenizer(tokenizer, group.prompt_ids)
        self.stops = StopStringMatcher(group.params.stop)
        self.matcher = group.constraint.matcher() if group.constraint is not None else None

    @property
    def params(self) -> SamplingParams:
        """The request's sampling parameters."""
        return self.group.params

    @property
    def tokens(self) -> list[int]:
        """Prompt and output so far."""
        return self.group.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Length of prompt and output."""
        return len(self.group.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """True while some known tokens have no KV yet (prompt, or after preemption)."""
        return self.num_cached < self.num_tokens - 1 or not self.output_ids

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone, recompute it from the tokens."""
        self.block_table = []
        self.num_cached = 0
        self.num_registered = 0
        self.status = SeqStatus.WAITING
