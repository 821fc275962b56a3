"""Test and benchmark utilities: run a real ``openllm-clone start`` on a free local port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

__all__ = ["Server", "free_port", "run_process", "run_server"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``openllm-clone start`` process on 127.0.0.1."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def logs(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    args: list[str],
    env: dict[str, str],
    log: Path,
    ready_timeout: float = 240.0,
    *,
    python: str | None = None,
    cwd: Path | None = None,
) -> Iterator[Server]:
    """Start ``openllm-clone start ARGS`` on a free port; wait for /readyz; stop it after.

    ``python`` is the interpreter to run it with (default: this one), ``cwd`` its
    working directory (``python -m`` puts it first on ``sys.path``).
    """
    port = free_port()
    cmd = [
        python or sys.executable,
        "-m",
        "openllm_clone",
        "start",
        *args,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    url = f"http://127.0.0.1:{port}"
    with run_process(cmd, env, log, f"{url}/readyz", ready_timeout, cwd=cwd) as proc:
        yield Server(url, proc, log)


@contextlib.contextmanager
def run_process(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    ready_url: str,
    ready_timeout: float,
    *,
    cwd: Path | None = None,
    name: str = "server",
    stop: signal.Signals = signal.SIGINT,
    stop_timeout: float = 20.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in a process group of its own (output to ``log``), wait until
    ``ready_url`` answers 200, and stop the group after (``stop``, then SIGKILL after
    ``stop_timeout`` s). Raises RuntimeError with the log's tail if it exits or is not
    ready in ``ready_timeout``. Shared by :func:`run_server` and bench/peers.py."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            cwd=cwd,
        )

    def tail() -> str:
        return log.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail()}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {ready_timeout} s:\n{tail()}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, stop)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
