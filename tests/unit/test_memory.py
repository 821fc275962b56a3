"""The server's heap trimming: glibc's malloc_trim where nothing else chose, when the
engine goes idle and at most every interval while it works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openllm_clone._memory import HeapTrimmer

CHECK = "from openllm_clone._memory import heap_trimmer as f; t = f(); print(t is not None)"


def _run(env: dict[str, str]) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k not in env}, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_trims_unless_the_environment_chose() -> None:
    assert _run({}) == "True"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
    assert _run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"
    assert _run({"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}) == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_real_malloc_trim_runs() -> None:
    from openllm_clone._memory import heap_trimmer

    trimmer = heap_trimmer()
    assert trimmer is not None
    assert trimmer.after_step(worked=True, idle=True) is True
    assert trimmer.trims == 1


def test_trims_when_idle_after_work_and_every_interval_while_busy() -> None:
    calls: list[int] = []
    trimmer = HeapTrimmer(lambda pad: calls.append(pad) or 1, interval=3600.0)
    # Busy: not before the interval.
    assert not trimmer.after_step(worked=True, idle=False)
    # Idle after work: once; idle again with nothing done since: not again.
    assert trimmer.after_step(worked=False, idle=True)
    assert not trimmer.after_step(worked=False, idle=True)
    assert calls == [0]
    # Busy past the interval: trims while the engine keeps working.
    trimmer.interval = 0.0
    assert trimmer.after_step(worked=True, idle=False)
    assert calls == [0, 0] and trimmer.trims == 2
