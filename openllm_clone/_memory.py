"""Keep a long-running server's resident memory from creeping up on glibc's heap.

glibc raises its mmap threshold each time a large ``mmap``-backed block is freed (up to 32
MiB), so that afterwards blocks of a few MiB (logits, LoRA stacks, adapter weights being
read) come from the heap instead; freed in a different order than allocated, they leave
holes glibc does not hand back, and a server's RSS grows for as long as it serves. Measured
with ``bench/soak.py`` here (SmolLM2, base + 8 adapters at concurrency 32): the worker
grew 48-66 MB a minute without a fixed threshold, 0.7 MB a minute with it (and started
about 0.2 GB lower). A fixed threshold of 1 MiB keeps every block that large in its own
mapping, returned to the system when freed.

Servers only (the BentoML worker, a Ray replica): an application that embeds
:class:`~openllm_clone.llm.LLM` keeps its allocator settings. Skipped when the
environment already chooses (``MALLOC_MMAP_THRESHOLD_``, or jemalloc/tcmalloc preloaded)
and on C libraries other than glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20  # bytes
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; True when it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if ok:
        logger.debug("glibc mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return ok
