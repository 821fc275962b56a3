"""Block allocation for the paged KV cache (vLLM's block manager, reduced to its core).

The runner owns the memory; this owns the bookkeeping: which blocks are free, and
how many sequences share each block (parallel samples share their prompt's blocks).
Block 0 is the runner's zeroed null block and is never handed out.
"""

from __future__ import annotations

__all__ = ["BlockAllocator", "blocks_for"]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return (num_tokens + block_size - 1) // block_size


class BlockAllocator:
    """A free list of KV blocks with reference counts."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Pop from the end: low block numbers first, which keeps touched memory compact.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - 1 - len(self._free)

    def allocate(self) -> int:
        """Take one free block; raise MemoryError when none is left."""
        if not self._free:
            raise MemoryError("KV cache is full")
        block = self._free.pop()
        self._refs[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def share(self, block: int) -> int:
        """Add a holder to ``block`` (copy-on-write sharing) and return it."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._refs[block] += 1
        return block

    def refcount(self, block: int) -> int:
        """How many sequences hold ``block``."""
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        """Drop one holder from each block; blocks nobody holds go back to the pool."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"double free of block {block}")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
