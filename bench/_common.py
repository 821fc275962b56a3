"""Shared benchmark helpers: seeded workloads, timing, tables."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

QUESTIONS = [
    "Explain how a refrigerator works.",
    "Write a short poem about the sea.",
    "What are the main causes of the French Revolution?",
    "Describe a healthy breakfast.",
    "How do vaccines train the immune system?",
    "Summarise the plot of Hamlet.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "What is the difference between weather and climate?",
    "How does a bicycle stay upright?",
    "Describe the water cycle.",
    "What makes a good team leader?",
    "Explain photosynthesis to a child.",
    "How do airplanes fly?",
    "What is machine learning?",
    "Tell me about the history of tea.",
]


def workload(
    n: int, seed: int = 0, out_min: int = 128, out_max: int = 128
) -> list[tuple[str, int]]:
    """``n`` (question, output length) pairs from a fixed seeded distribution."""
    rng = random.Random(seed)
    return [(rng.choice(QUESTIONS) + f" (#{i})", rng.randint(out_min, out_max)) for i in range(n)]


def pct(values: Sequence[float], q: float) -> float:
    """Percentile (0-100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    """Median, nan for no values."""
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table (markdown-compatible)."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [
            line(headers),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in cells),
        ]
    )


def rss_peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, MiB."""
    from pathlib import Path

    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
        for c in list(pids[1:]):
            grand = Path(f"/proc/{c}/task/{c}/children").read_text().split()
            pids += [int(g) for g in grand]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total
