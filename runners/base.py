"""The runner protocol: what the engine asks of whatever executes the model.

The engine schedules; the runner computes. One call to :meth:`ModelRunner.step`
runs one forward pass over a packed batch of rows, each row with its own adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ModelInfo",
    "ModelRunner",
    "PackedRows",
    "StepRow",
    "logit_rows",
    "pack_rows",
    "put_hidden_states",
]


@dataclass
class StepRow:
    """One sequence's share of a step.

    ``token_ids`` are the tokens whose KV this step computes (a prompt chunk, or the
    last sampled token); ``start_pos`` is how many tokens of the sequence are
    already in the KV cache; ``block_table`` lists the KV blocks the sequence owns,
    enough for ``start_pos + len(token_ids)`` tokens. ``all_logits`` asks for the logits
    of every token of the row (prompt logprobs), not only of its last; ``hidden`` for the
    final hidden states of its tokens (embeddings), which eager steps compute.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    adapter_slot: int = 0
    need_logits: bool = True
    all_logits: bool = False
    # An embedding request's row: the runner puts the final (normed) hidden states of the
    # row's tokens, float32 ``[len(token_ids), hidden]``, in ``hidden_states``.
    hidden: bool = False
    hidden_states: Any = None


@dataclass
class PackedRows:
    """A step's rows as one packed sequence, single-token (decode) rows first.

    ``ids``, ``positions`` and ``slots`` (each token's KV cache slot) run over every
    token of every row in that order; ``wanted`` are the packed indices of the tokens
    whose logits are asked for (the last token of a row with ``need_logits``, every token
    of one with ``all_logits``), and ``back`` puts those logits back into the caller's row
    order (see :func:`logit_rows`).
    """

    rows: list[StepRow]
    num_decode: int
    ids: list[int]
    positions: list[int]
    slots: list[int]
    lengths: list[int]
    wanted: list[int]
    back: list[int]

    def token_slots(self) -> list[int]:
        """Each packed token's adapter slot."""
        return [
            r.adapter_slot for r, n in zip(self.rows, self.lengths, strict=True) for _ in range(n)
        ]


def logit_rows(row: StepRow) -> int:
    """How many logit rows ``step`` returns for ``row``: every token's with ``all_logits``,
    the last token's with ``need_logits``, else none."""
    if row.all_logits:
        return len(row.token_ids)
    return 1 if row.need_logits else 0


def put_hidden_states(packed: PackedRows, hidden: Any, norm: Any = None) -> None:
    """Give each row that asks for them its tokens' final hidden states, ``hidden`` being
    the step's ``[T, H]`` over the packed tokens (``norm``: the model's final norm, when
    ``hidden`` is before it)."""
    start = 0
    for row, n in zip(packed.rows, packed.lengths, strict=True):
        if row.hidden:
            h = hidden[start : start + n]
            row.hidden_states = (norm(h) if norm is not None else h).float().cpu()
        start += n


def pack_rows(rows: list[StepRow], block_size: int) -> PackedRows:
    """Order and flatten ``rows`` for one forward (see :class:`PackedRows`)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].token_ids) > 1)
    ordered = [rows[i] for i in order]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lengths: list[int] = []
    wanted: list[int] = []
    rank: dict[int, list[int]] = {}
    for i, row in zip(order, ordered, strict=True):
        n = len(row.token_ids)
        ids.extend(row.token_ids)
        lengths.append(n)
        for pos in range(row.start_pos, row.start_pos + n):
            positions.append(pos)
            slots.append(row.block_table[pos // block_size] * block_size + pos % block_size)
        k = logit_rows(row)
        if k:
            rank[i] = list(range(len(wanted), len(wanted) + k))
            wanted.extend(range(len(ids) - k, len(ids)))
    back = [j for i in range(len(rows)) for j in rank.get(i, ())]
    num_decode = sum(1 for r in ordered if len(r.token_ids) == 1)
    return PackedRows(ordered, num_decode, ids, positions, slots, lengths, wanted, back)


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
    hidden_size: int = 0  # the final hidden states' width (an embedding's dimensions)
    extra: dict[str, Any] = field(default_factory=dict)


class ModelRunner(Protocol):
    """What the engine and the LLM need from a runner (both runners implement it)."""

    info: ModelInfo
    block_size: int
    num_blocks: int
    kv_bytes_per_token: int
    model: Any  # the transformers model (its generation_config holds end-of-sequence ids)
    config: Any  # its config
    lora: Any  # the LoraBank: adapter slots and which load of an adapter each slot holds

    def step(self, rows: list[StepRow]) -> Any:
        """Run one forward; return fp32 logits, :func:`logit_rows` rows per row, in order."""
        ...

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV block's keys and values (a fork's last partial block)."""
        ...

    def warmup(self) -> None:
        """Compile what ``--compile`` compiles, before the first request."""
        ...

    def warmup_compiles(self) -> bool:
        """True when :meth:`warmup` would compile (minutes), not load from the cache."""
        ...

    def close(self) -> None:
        """Release what outlives the process's objects (a background compile)."""
        ...

    def idle(self) -> bool:
        """Between steps while no request runs: do what waits for a step (pick up a
        finished background compile). True while it has such work: the engine then calls
        again within a second rather than sleeping until the next request."""
        ...

    @property
    def compiled(self) -> bool:
        """True when some of the step runs compiled."""
        ...

    def compiled_stats(self) -> dict[str, Any] | None:
        """What runs compiled and how often (``/v1/metadata``); None without ``--compile``."""
        ...
