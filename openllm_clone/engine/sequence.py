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

__all__ = [
    "AdapterRef",
    "RequestGroup",
    "RequestOutput",
    "SeqDelta",
    "SeqStatus",
    "Sequence",
    "TokenLogprob",
]


@dataclass(frozen=True)
class AdapterRef:
    """The adapter a request runs with, fixed when it is accepted: its name, its slot in
    the runner's LoRA bank, and which load of the adapter that slot holds (prefix-cache
    keys include it, so KV computed under an earlier occupant of the slot is not reused).
    The adapter registry hands it out (``acquire``) and keeps the slot for the request."""

    name: str
    slot: int
    load: int


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
    adapter: AdapterRef | None
    queue: asyncio.Queue[RequestOutput]
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    seqs: list[Sequence] = field(default_factory=list)
    cancelled: bool = False
    forked: bool = False
    constraint: Any = None  # a structured.Constraint: every sequence gets a matcher
    deadline: float | None = None  # perf_counter time after which the request is failed
    prompt_lp: list[TokenLogprob] = field(default_factory=list)  # for prompt tokens 1, 2, ...
    prompt_lp_sent: bool = False
    hidden: Any = None  # an embedding request's final hidden states, [prompt, H] float32
    tenant: str | None = None  # whose key sent it (fair scheduling, metering, token limits)
    weight: float = 1.0  # the tenant's share of the engine under fair scheduling

    @property
    def adapter_name(self) -> str | None:
        """The adapter's name (None: the base model)."""
        return self.adapter.name if self.adapter is not None else None

    @property
    def adapter_slot(self) -> int:
        """The adapter's LoRA-bank slot (0: none)."""
        return self.adapter.slot if self.adapter is not None else 0

    @property
    def adapter_key(self) -> tuple[int, int] | None:
        """(slot, load) of the adapter: part of this request's prefix-cache keys."""
        return (self.adapter.slot, self.adapter.load) if self.adapter is not None else None

    def keep_hidden(self, start: int, states: torch.Tensor) -> None:
        """Hidden states of prompt tokens ``start``, ``start + 1``, ... (an embedding's; a
        chunk computed again after a preemption writes the same rows)."""
        import torch

        if self.hidden is None:
            self.hidden = torch.zeros(len(self.prompt_ids), states.shape[-1])
        self.hidden[start : start + states.shape[0]] = states

    def embedding(self) -> list[float]:
        """The prompt's pooled hidden states (``params.pooling``), L2-normalised when asked."""
        import torch

        assert self.hidden is not None, "an embedding request finished without its states"
        vector = self.hidden[-1] if self.params.pooling == "last" else self.hidden.mean(0)
        if self.params.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return [float(x) for x in vector.tolist()]

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

    def append_token(self, token: int, eos_ids: set[int], max_model_len: int) -> SeqDelta:
        """Add a sampled token: its grammar state, its text (held back while it may
        still become a stop string) and its finish reason, when this token ends it."""
        self.output_ids.append(token)
        params = self.params
        finish: str | None = None
        text = ""
        if self.matcher is not None and token not in eos_ids:
            self.matcher.accept_token(token)
        if token in eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            text = self.stops.feed(self.detok.add(token))
            if self.stops.stopped:
                finish = "stop"
        if finish is None and self.matcher is not None and self.matcher.is_terminated():
            finish = "stop"
        if finish is None and (
            len(self.output_ids) >= params.max_new_tokens or self.num_tokens >= max_model_len
        ):
            finish = "length"
        if finish is not None and not self.stops.stopped:
            text += self.stops.feed(self.detok.flush()) + self.stops.flush()
        return SeqDelta(index=self.index, text=text, token_ids=[token], finish_reason=finish)

    @property
    def wants_all_logits(self) -> bool:
        """True while the prompt still has positions whose logprobs the request asked for."""
        return self.group.wants_prompt_logits and self.num_cached < len(self.group.prompt_ids) - 1
