"""Which sequences run in the next step, and how much of each (no torch).

Every step: running sequences first (a decode row each, or the next chunk of an
unfinished prompt within the prefill token budget), then waiting sequences admitted in
arrival order while the batch has room, the budget lasts and free KV blocks remain (one
block per running sequence is kept for their next tokens). When a running sequence needs
a block and none is free, the newest running sequence not in this step is preempted: its
blocks are freed and it waits, first in line, to be recomputed.

Fair mode (``fair=True``) admits by tenant instead of by arrival: a virtual token counter
per tenant (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024) grows by
every token the tenant's sequences compute, prompt tokens at 1 and generated tokens at 2
(decoding a token costs more than prefilling one), divided by the tenant's weight; the
waiting sequence whose tenant has the lowest counter goes next (arrival breaks ties). A
tenant that comes back after idling starts at the lowest counter among the tenants with
work, so idle time does not bank credit. When the batch is full and a waiting tenant
holds less than its weighted share of it, the newest sequence of the tenant furthest over
its share is paused (it keeps its KV blocks and resumes later), so a tenant with 100
queued requests cannot make one with 1 wait for a whole batch to finish. A new request
of a tenant with nothing running, while other tenants' sequences run, is prefilled in a
step of its own (its prompt, without their decode rows): its first token then waits for
the step in flight and its own prompt, not for a whole batch's step beside it. Where the
step runs in stages, the engine asks between two of them (:meth:`Scheduler.interject`),
so such a request waits for one stage of the step in flight, not all of it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

__all__ = ["OUTPUT_TOKEN_COST", "PROMPT_TOKEN_COST", "ScheduledRow", "Scheduler"]

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRow:
    """One sequence's share of a step: the tokens to compute and whether the last one's
    logits are needed (it is the sequence's last known token)."""

    seq: Sequence
    tokens: list[int]
    need_logits: bool


class Scheduler:
    """The waiting queue and the running batch, under the batch and prefill budgets."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_batch_size: int,
        max_prefill_tokens: int,
        fair: bool = False,
    ) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.fair = fair
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}  # fair mode: virtual tokens served per tenant
        self.paused = 0  # fair mode: sequences paused to make room for a tenant under its share

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, *, first: bool = False) -> None:
        """Queue ``seq`` (at the front with ``first``)."""
        if self.fair:
            tenant = _tenant(seq)
            if not self._active(tenant):
                # Back from idle: no credit for the time away.
                active = [self.counters.get(_tenant(s), 0.0) for s in self._all()]
                floor = min(active, default=0.0)
                self.counters[tenant] = max(self.counters.get(tenant, floor), floor)
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def _all(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def _active(self, tenant: str) -> bool:
        return any(_tenant(s) == tenant for s in self._all())

    def _next_waiting(self, among: list[Sequence] | None = None) -> Sequence:
        """The waiting sequence to admit next (of ``among``, waiting ones in line order,
        where given). Fifo: the head of the line (preempted sequences go back to its
        front). Fair: the front-most of the tenant served least (the counters, not the
        line, keep a preempted sequence from starving)."""
        if not self.fair:
            return self.waiting[0] if among is None else among[0]
        # Equal counters (a tenant back from idle starts at the lowest): the tenant with
        # fewer running sequences first, then the line's order.
        running = self._running_per_tenant()
        return min(
            self.waiting if among is None else among,
            key=lambda s: (self.counters.get(_tenant(s), 0.0), running.get(_tenant(s), 0)),
        )

    def _running_per_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for seq in self.running:
            counts[_tenant(seq)] = counts.get(_tenant(seq), 0) + 1
        return counts

    def _rebalance(self) -> None:
        """Fair mode, with the batch full: when a waiting tenant holds fewer running
        sequences than its weighted share of the batch, pause the newest sequence of the
        tenant furthest over its share: it leaves the batch but keeps its KV blocks, so it
        resumes where it stopped, with nothing to recompute (KV pressure can still take
        them). Without this a short request waits for a whole batch of long ones to
        finish, however fair the admission order."""
        if len(self.running) < self.max_batch_size or not self.waiting:
            return
        slots, share = self._running_per_tenant(), self._shares()
        starved = any(slots.get(_tenant(seq), 0) + 1 <= share[_tenant(seq)] for seq in self.waiting)
        if not starved:
            return
        over = _furthest_over(slots, share)
        if slots[over] - share[over] < 1:
            return
        self._pause_newest(over)

    def _shares(self) -> dict[str, float]:
        """Each tenant's weighted share of the batch's rows."""
        weights = {_tenant(seq): seq.group.weight for seq in self._all()}
        total = sum(weights.values())
        return {t: self.max_batch_size * w / total for t, w in weights.items()}

    def _pause_newest(self, tenant: str) -> bool:
        """Pause ``tenant``'s newest decoding sequence (it keeps its KV blocks)."""
        for seq in reversed(self.running):
            if _tenant(seq) == tenant and seq.block_table and not seq.in_prefill:
                logger.debug("fair share: pausing %s", seq.group.request_id)
                self.running.remove(seq)
                seq.status = SeqStatus.WAITING
                self.waiting.appendleft(seq)
                self.paused += 1
                return True
        return False

    def _trim(self) -> None:
        """Fair mode: back to ``max_batch_size`` running sequences after an interjected
        one (:meth:`interject`) joined a full batch, pausing the newest of the tenant
        furthest over its share."""
        while len(self.running) > self.max_batch_size:
            slots, share = self._running_per_tenant(), self._shares()
            if not self._pause_newest(_furthest_over(slots, share)):
                return

    def _charge(self, rows: list[ScheduledRow]) -> None:
        """Fair mode: each row's tokens count against its tenant's virtual counter."""
        for row in rows:
            seq = row.seq
            cost = OUTPUT_TOKEN_COST if not seq.in_prefill else PROMPT_TOKEN_COST * len(row.tokens)
            tenant = _tenant(seq)
            self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / seq.group.weight

    def add_running(self, seq: Sequence) -> None:
        """A sequence that starts running without admission (a fork of a running one)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queue or the batch (it finished or was cancelled)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[ScheduledRow]:
        """Pick the rows of the next step."""
        if self.fair:
            self._trim()
            self._rebalance()
            express = self._express()
            if express is not None:
                self._charge([express])
                return [express]
        budget = self.max_prefill_tokens
        rows: list[ScheduledRow] = []
        scheduled: set[int] = set()
        # Running sequences first: decode rows, then unfinished prompt chunks.
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue
            todo = seq.tokens[seq.num_cached :]
            if len(todo) > 1:
                todo = todo[: max(budget, 0)]
                if not todo:
                    continue
                budget -= len(todo)
            if not self._reserve(seq, seq.num_cached + len(todo), scheduled):
                continue
            scheduled.add(id(seq))
            rows.append(ScheduledRow(seq, todo, seq.num_cached + len(todo) == seq.num_tokens))
        # Then admit waiting sequences while there is room.
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            row = self._admit(self._next_waiting(), budget, scheduled)
            if row is None:
                break
            budget -= len(row.tokens)
            rows.append(row)
        if self.fair:
            self._charge(rows)
        return rows

    def _admit(self, seq: Sequence, budget: int, scheduled: set[int]) -> ScheduledRow | None:
        """Move waiting ``seq`` into the batch with its next chunk (at most ``budget``
        tokens), or leave it waiting (None) when the KV blocks are not there."""
        matched = self.blocks.match_prefix(seq)
        todo = seq.tokens[seq.num_cached :][:budget]
        # Keep a block per running sequence free for their next tokens.
        spare = self.blocks.num_free - len(self.running)
        if self.blocks.needed(seq, seq.num_cached + len(todo)) > spare:
            self.blocks.unmatch(seq, matched)
            return None
        self.waiting.remove(seq)
        if not self._reserve(seq, seq.num_cached + len(todo), scheduled):
            self.blocks.unmatch(seq, matched)
            self.waiting.appendleft(seq)
            return None
        scheduled.add(id(seq))
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return ScheduledRow(seq, todo, seq.num_cached + len(todo) == seq.num_tokens)

    def _fresh(self) -> Sequence | None:
        """Fair mode: the new request (nothing computed yet) of a tenant with nothing
        running, while other tenants' sequences run, to prefill on its own (the
        least-served such tenant's); None when there is none."""
        if not self.fair or not self.running or not self.waiting:
            return None
        busy = self._running_per_tenant()
        fresh = [
            s
            for s in self.waiting
            if _tenant(s) not in busy and not s.block_table and s.num_cached == 0
        ]
        return self._next_waiting(fresh) if fresh else None

    def _express(self) -> ScheduledRow | None:
        """Fair mode, while the batch has room: the :meth:`_fresh` request is prefilled
        alone this step."""
        seq = self._fresh() if len(self.running) < self.max_batch_size else None
        return None if seq is None else self._admit(seq, self.max_prefill_tokens, set())

    def interject(self, in_flight: set[int]) -> ScheduledRow | None:
        """Fair mode, between two stages of a step in flight (its sequences' ids in
        ``in_flight``, never preempted here): the :meth:`_fresh` request, to prefill now
        in a step of its own, its first token out before the step in flight ends. It
        joins the batch even when the batch is full; the next :meth:`schedule` pauses a
        sequence of the tenant furthest over its share to make room."""
        seq = self._fresh()
        if seq is None:
            return None
        row = self._admit(seq, self.max_prefill_tokens, in_flight)
        if row is not None:
            self._charge([row])
        return row

    def _reserve(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Give ``seq`` blocks for ``num_tokens``; preempt newer sequences if needed."""
        need = self.blocks.needed(seq, num_tokens)
        while need > self.blocks.num_free:
            victim = self._victim(seq, scheduled)
            if victim is None:
                return False
            self.preempt(victim)
        self.blocks.grow(seq, num_tokens)
        return True

    def _victim(self, seq: Sequence, scheduled: set[int]) -> Sequence | None:
        """The newest running sequence not already in this step's rows, else the newest
        paused one (waiting with its blocks kept)."""
        for other in reversed(self.running):
            if other is not seq and id(other) not in scheduled and other.block_table:
                return other
        for other in self.waiting:
            if other is not seq and other.block_table:
                return other
        return None

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks; it waits, first in line, to be recomputed."""
        logger.info("KV cache full: preempting %s for recompute", seq.group.request_id)
        self.blocks.release(seq)
        seq.reset_for_recompute()
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)  # a paused sequence gives up its blocks
        self.waiting.appendleft(seq)


def _tenant(seq: Sequence) -> str:
    return seq.group.tenant or ""


def _furthest_over(slots: dict[str, int], share: dict[str, float]) -> str:
    """The tenant running the most sequences beyond its share of the batch."""
    return max(slots, key=lambda t: slots[t] - share[t])
