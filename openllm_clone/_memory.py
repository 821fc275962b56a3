"""Keep a long-running server's resident memory from creeping up on glibc's heap, without
slowing its steps.

glibc raises its mmap threshold each time a large ``mmap``-backed block is freed (up to 32
MiB), so that afterwards blocks of a few MiB (a step's activations and attention
gathers, logits, LoRA stacks, adapter weights being read) come from the heap instead;
freed in a different order than allocated, they leave holes that glibc keeps resident,
and a server's RSS grows for as long as it serves (``bench/soak.py`` here, SmolLM2, base
+ 8 adapters at concurrency 32: the worker grew 48-66 MB a minute).

The first fix pinned the mmap threshold at 1 MiB. It stopped the growth but put every
block of 1 MiB or more in a fresh mapping, page-faulted in on every use and unmapped on
every free: in the server, a batch-16 decode step of SmolLM2 in float32 slowed as its
context grew (73 ms at 16 tokens, 186 ms at 140, against 71-89 ms without), and 64
streams of 128 tokens ran at 114-119 tok/s against 190-195 without (one A/B run).

Now the heap keeps glibc's own policy (blocks are reused, no page faults per step) and a
:class:`HeapTrimmer` gives the free pages back with ``malloc_trim(0)`` (which, since
glibc 2.8, releases whole free pages inside the heap, the holes included): when the
engine goes idle and at most every ``interval`` seconds while it runs, so between two
trims the heap grows by at most what that stretch of serving left free.

Servers only (the BentoML worker, a Ray replica): an application that embeds
:class:`~openllm_clone.llm.LLM` keeps its allocator settings. Skipped when the
environment already chooses (``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``,
or jemalloc/tcmalloc preloaded) and on C libraries other than glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

__all__ = ["TRIM_INTERVAL", "HeapTrimmer", "heap_trimmer"]

logger = logging.getLogger(__name__)

TRIM_INTERVAL = 30.0  # seconds between two trims while the engine is busy


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, unless the environment chose another allocator policy."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` when the engine goes idle after work, and every
    ``interval`` seconds while it keeps working (the engine calls :meth:`after_step`)."""

    def __init__(self, trim: Callable[[int], int], *, interval: float = TRIM_INTERVAL) -> None:
        self._trim = trim
        self.interval = interval
        self.trims = 0
        self._last = time.monotonic()
        self._dirty = False  # work since the last trim

    def after_step(self, *, worked: bool, idle: bool) -> bool:
        """Trim now if due; True when it trimmed."""
        if worked:
            self._dirty = True
        if not self._dirty:
            return False
        now = time.monotonic()
        if not idle and now - self._last < self.interval:
            return False
        self._trim(0)
        self._last, self._dirty = now, False
        self.trims += 1
        logger.debug("malloc_trim in %.1f ms", 1000 * (time.monotonic() - now))
        return True


def heap_trimmer(interval: float = TRIM_INTERVAL) -> HeapTrimmer | None:
    """A trimmer for this process, or None where glibc's is not the allocator in charge."""
    trim = _malloc_trim()
    return None if trim is None else HeapTrimmer(trim, interval=interval)
