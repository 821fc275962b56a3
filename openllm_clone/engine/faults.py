"""Fault isolation: when a batched forward raises, find the rows that fail on their own.

The rows run again in halves until each failure is down to one row (a binary search over
the batch: ``2 log2(n)`` extra forwards for one bad row in ``n``); the engine then fails
only those requests and goes on with the others' logits. Running rows again is safe: a
row writes the keys and values of the same tokens into the same KV slots each time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from openllm_clone.runners.base import StepRow, logit_rows

__all__ = ["Isolated", "isolate_faults"]


@dataclass
class Isolated:
    """The outcome of :func:`isolate_faults`."""

    failed: dict[int, Exception] = field(default_factory=dict)  # row index -> its error
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row index -> its logits


def isolate_faults(
    forward: Callable[[list[StepRow]], torch.Tensor],
    step_rows: list[StepRow],
    *,
    known_bad: bool = True,
) -> Isolated:
    """Run ``step_rows`` through ``forward`` in halves until every row either gave its
    logits or failed alone. ``known_bad``: the whole batch already failed once (it is not
    run again as a whole)."""
    found = Isolated()

    def run(idx: list[int], bad: bool) -> None:
        if not bad:
            try:
                out = forward([step_rows[i] for i in idx])
            except Exception as exc:  # noqa: BLE001 - split further below
                if len(idx) == 1:
                    found.failed[idx[0]] = exc
                    return
            else:
                at = 0
                for i in idx:
                    k = logit_rows(step_rows[i])
                    found.logits[i] = out[at : at + k]
                    at += k
                return
        mid = len(idx) // 2
        run(idx[:mid], False)
        run(idx[mid:], False)

    run(list(range(len(step_rows))), known_bad and len(step_rows) > 1)
    return found
