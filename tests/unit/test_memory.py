"""The server's glibc mmap threshold: set where nothing else chose, left alone otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from openllm_clone import _memory

CHECK = "from openllm_clone._memory import fix_mmap_threshold as f; print(f())"


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
def test_threshold_is_fixed_unless_the_environment_chose() -> None:
    # A fresh process each time: mallopt is process-wide.
    assert _run({}) == "True"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
    assert _run({"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}) == "False"
    assert _memory.MMAP_THRESHOLD == 1 << 20
