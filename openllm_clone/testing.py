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

__all__ = ["Server", "free_port", "run_server"]


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
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            cwd=cwd,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{server.logs()[-4000:]}"
                )
            try:
                if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not ready in {ready_timeout} s:\n{server.logs()[-4000:]}"
                )
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
