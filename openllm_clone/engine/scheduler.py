"""Which sequences run in the next step, and how much of each (no torch).

Every step: running sequences first (a decode row each, or the next chunk of an
unfinished prompt within the prefill token budget), then waiting sequences admitted in
arrival order while the batch has room, the budget lasts and free KV blocks remain (one
block per running sequence is kept for their next tokens). When a running sequence needs
a block and none is free, the newest running sequence not in this step is preempted: its
blocks are freed and it waits, first in line, to be recomputed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

__all__ = ["ScheduledRow", "Scheduler"]

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
        self, blocks: BlockManager, *, max_batch_size: int, max_prefill_tokens: int
    ) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, *, first: bool = False) -> None:
        """Queue ``seq`` (at the front with ``first``)."""
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

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
            seq = self.waiting[0]
            matched = self.blocks.match_prefix(seq)
            todo = seq.tokens[seq.num_cached :][:budget]
            # Keep a block per running sequence free for their next tokens.
            spare = self.blocks.num_free - len(self.running)
            if self.blocks.needed(seq, seq.num_cached + len(todo)) > spare:
                self.blocks.unmatch(seq, matched)
                break
            self.waiting.popleft()
            if not self._reserve(seq, seq.num_cached + len(todo), scheduled):
                self.blocks.unmatch(seq, matched)
                self.waiting.appendleft(seq)
                break
            scheduled.add(id(seq))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            budget -= len(todo)
            rows.append(ScheduledRow(seq, todo, seq.num_cached + len(todo) == seq.num_tokens))
        return rows

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
        """The newest running sequence not already in this step's rows."""
        for other in reversed(self.running):
            if other is not seq and id(other) not in scheduled and other.block_table:
                return other
        return None

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks; it waits, first in line, to be recomputed."""
        logger.info("KV cache full: preempting %s for recompute", seq.group.request_id)
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.running.remove(seq)
        self.waiting.appendleft(seq)
