"""Per-sequence KV block tables over :class:`~.kv_cache.BlockAllocator` (no torch).

What a sequence's blocks are and how they change: prefix matching against the prefix
cache, registering newly full blocks, growing a table for the tokens a step computes,
copy-on-write forks for ``n > 1`` (full blocks shared, the last partial one copied) and
release. The allocator does the counting; the runner owns the memory (a fork returns the
block pair the runner must copy).
"""

from __future__ import annotations

from .kv_cache import BlockAllocator, block_hash, blocks_for
from .sequence import Sequence

__all__ = ["BlockManager"]


class BlockManager:
    """Block tables of sequences, over one allocator."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size

    @property
    def num_free(self) -> int:
        """Blocks a sequence could take now (cached, unreferenced ones included)."""
        return self.allocator.num_free

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks ``seq`` needs to hold ``num_tokens`` tokens."""
        return blocks_for(num_tokens, self.block_size) - len(seq.block_table)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` the blocks for ``num_tokens`` (the caller made room)."""
        for _ in range(self.needed(seq, num_tokens)):
            seq.block_table.append(self.allocator.allocate())

    def release(self, seq: Sequence) -> None:
        """Give back every block of ``seq`` (cached ones stay in the prefix cache)."""
        if seq.block_table:
            self.allocator.free(seq.block_table)
            seq.block_table = []

    # --- prefix cache -------------------------------------------------------------------

    def hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Prefix-cache keys of ``seq``'s first ``num_blocks`` full blocks (memoised). The
        adapter that computes a block changes its keys and values: its key is part of the
        hash."""
        keys = seq.block_hashes
        if len(keys) < num_blocks:
            bs = self.block_size
            tokens = seq.tokens
            extra = seq.group.adapter_key
            for j in range(len(keys), num_blocks):
                keys.append(
                    block_hash(keys[j - 1] if j else None, tokens[j * bs : (j + 1) * bs], extra)
                )
        return keys[:num_blocks]

    def match_prefix(self, seq: Sequence) -> int:
        """Start a fresh sequence on the cached blocks of its longest known prefix; returns
        how many it took.

        The block holding the last known token is never taken: that token is computed
        again, for its logits, into a block of the sequence's own. A request asking for its
        prompt's logprobs takes none (cached blocks come without logits), nor does an
        embedding request (nor without the hidden states it pools).
        """
        if (
            seq.block_table
            or not self.allocator.prefix_caching
            or seq.group.wants_prompt_logits
            or seq.params.pooling is not None
        ):
            return 0
        usable = (seq.num_tokens - 1) // self.block_size
        if usable <= 0:
            return 0
        blocks = self.allocator.lookup(self.hashes(seq, usable))
        seq.block_table = blocks
        seq.num_registered = len(blocks)
        seq.num_cached = len(blocks) * self.block_size
        return len(blocks)

    def unmatch(self, seq: Sequence, matched: int) -> None:
        """Give back blocks a sequence that stays waiting took from the prefix cache."""
        if matched:
            self.release(seq)
            seq.num_cached = seq.num_registered = 0

    def register(self, seq: Sequence) -> None:
        """Record the sequence's newly completed full blocks in the prefix cache."""
        full = seq.num_cached // self.block_size
        if full <= seq.num_registered or not self.allocator.prefix_caching:
            return
        keys = self.hashes(seq, full)
        for j in range(seq.num_registered, full):
            self.allocator.register(seq.block_table[j], keys[j])
        seq.num_registered = full

    # --- forks ------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's full blocks with ``child`` and give it a copy of the last
        partial one: returns ``(source, destination)`` for the runner to copy, or None when
        there is nothing to copy. Raises MemoryError (leaving ``child`` without blocks)
        when no block is free for the copy."""
        bs = self.block_size
        full = parent.num_cached // bs
        child.block_table = [self.allocator.share(b) for b in parent.block_table[:full]]
        copy = None
        if parent.num_cached % bs:
            try:
                block = self.allocator.allocate()
            except MemoryError:
                self.release(child)
                raise
            child.block_table.append(block)
            copy = (parent.block_table[full], block)
        child.num_cached = parent.num_cached
        child.block_hashes = parent.block_hashes[:full]
        child.num_registered = min(parent.num_registered, full)
        return copy
