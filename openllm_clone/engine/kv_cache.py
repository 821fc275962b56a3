"""Block allocation for the paged KV cache (vLLM's block manager, reduced to its core).

The runner owns the memory; this owns the bookkeeping: which blocks are free, and
how many sequences share each block (parallel samples share their prompt's blocks).
Block 0 is the runner's zeroed null block and is never handed out.

Automatic prefix caching (vLLM's APC): a full block whose keys and values are computed
is registered under a hash of its tokens, the hashes of all blocks before it and the
adapter that computed it. A new sequence whose first blocks hash the same takes those
blocks (shared, reference-counted) instead of recomputing them. When the last holder
frees a registered block it is kept, evictable, in least-recently-freed order: it is
reused by a later hit, or handed out (and forgotten) only when no plain free block is
left, so cached prefixes cost no capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["BlockAllocator", "block_hash", "blocks_for"]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return (num_tokens + block_size - 1) // block_size


def block_hash(parent: int | None, tokens: list[int], extra: Hashable = None) -> int:
    """The key of a full block: its tokens, everything before it (``parent``) and ``extra``
    (the adapter that computed it)."""
    return hash((parent, extra, tuple(tokens)))


class BlockAllocator:
    """A free list of KV blocks with reference counts and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        # Pop from the end: low block numbers first, which keeps touched memory compact.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        self.peak_used = 0
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced
        self.prefix_hits = 0  # blocks taken from the cache instead of computed
        self.prefix_queries = 0  # full blocks looked up

    @property
    def num_free(self) -> int:
        """Blocks not held by any sequence (cached ones included: they can be reused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - 1 - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose contents are registered in the prefix cache."""
        return len(self._by_hash)

    def allocate(self) -> int:
        """Take one free block; raise MemoryError when none is left."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)  # the least recently freed
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise MemoryError("KV cache is full")
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
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # --- prefix cache ---------------------------------------------------------------

    def register(self, block: int, key: int) -> None:
        """Record that ``block`` (full, computed, held) holds the contents hashed ``key``."""
        if not self.prefix_caching or key in self._by_hash or block in self._hash_of:
            return  # the same prefix computed twice at once: keep the first copy
        self._by_hash[key] = block
        self._hash_of[block] = key

    def lookup(self, keys: list[int]) -> list[int]:
        """Take the cached blocks of the longest prefix of ``keys`` (each now held once more)."""
        if not self.prefix_caching:
            return []
        self.prefix_queries += len(keys)
        out: list[int] = []
        for key in keys:
            block = self._by_hash.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            out.append(block)
        self.prefix_hits += len(out)
        if out:
            self.peak_used = max(self.peak_used, self.num_used)
        return out
