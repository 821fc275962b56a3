"""SIGTERM drains in-flight streams before the server exits."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from openllm_clone.testing import run_server

pytestmark = pytest.mark.e2e


def test_sigterm_drains_in_flight_streams(tiny_model_dir: Path, tmp_path: Path) -> None:
    with run_server(
        [str(tiny_model_dir), "--dtype", "float32", "--kv-cache-mb", "16"],
        {},
        tmp_path / "server.log",
    ) as server:
        events: list[dict[str, object]] = []
        done = threading.Event()

        def consume() -> None:
            body = {"prompt": "count", "max_new_tokens": 400, "ignore_eos": True}
            with httpx.stream(
                "POST", f"{server.url}/v1/generate_stream", json=body, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                    elif line == "data: [DONE]":
                        done.set()

        reader = threading.Thread(target=consume)
        reader.start()
        while len(events) < 5:
            time.sleep(0.01)
        os.kill(server.proc.pid, signal.SIGTERM)
        reader.join(timeout=120)
        assert done.is_set(), "the in-flight stream was cut"
        tokens = sum(len(o["token_ids"]) for e in events for o in e["outputs"])  # type: ignore[index]
        assert tokens == 400
        server.proc.wait(timeout=60)
        assert server.proc.returncode is not None
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/readyz", timeout=2)
        # One structured line per request, without the prompt's text.
        lines = [
            json.loads(line.split("openllm_clone.requests: ", 1)[1])
            for line in server.logs().splitlines()
            if "openllm_clone.requests: " in line
        ]
        mine = [line for line in lines if line["completion_tokens"] == 400]
        assert mine and mine[0]["status"] == "ok" and mine[0]["prompt_tokens"] >= 1
        assert set(mine[0]) >= {"request_id", "adapter", "latency_ms", "ttft_ms"}
        assert (
            "prompt" not in mine[0]
            and "count" not in server.logs().split("openllm_clone.requests")[-1]
        )


def _worker_pids(server_pid: int) -> list[int]:
    """BentoML's worker processes under the server (children of ``start``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if parent == server_pid and "_bentoml_impl.worker" in cmd:
            found.append(int(entry))
    return found


def test_a_killed_worker_fails_its_stream_at_once_and_comes_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker mid-stream: the client gets a clear, retryable connection error
    within seconds (a dead process can send no error event), /readyz is not 200 while
    BentoML starts a new worker, then it is, and requests are served again."""
    from openllm_clone.client import APIConnectionError, HTTPClient

    with run_server(
        [str(tiny_model_dir), "--dtype", "float32", "--kv-cache-mb", "16"],
        {},
        tmp_path / "server.log",
    ) as server:
        (worker,) = _worker_pids(server.proc.pid)
        client = HTTPClient(server.url, timeout=60)
        events = 0
        killed_at = 0.0
        with pytest.raises(APIConnectionError, match="closed the connection"):
            for _ in client.generate_stream("count", max_new_tokens=400, ignore_eos=True):
                events += 1
                if events == 3:
                    killed_at = time.monotonic()
                    os.kill(worker, signal.SIGKILL)
        # Ended by the kill, not by the client's 60 s read timeout (generous: a busy CI
        # machine; it takes well under a second here).
        assert time.monotonic() - killed_at < 30
        # The old worker is gone and the new one not ready: a probe with a timeout (as
        # orchestrators send them) does not get a 200 (the connection waits in the
        # socket's backlog until the new worker accepts it).
        try:
            probe = httpx.get(f"{server.url}/readyz", timeout=2).status_code
        except httpx.HTTPError:
            probe = None
        assert probe != 200
        deadline = time.monotonic() + 180
        while not client.health():
            assert time.monotonic() < deadline, "no worker came back"
            time.sleep(0.5)
        assert _worker_pids(server.proc.pid) != [worker]
        assert client.generate("again", max_new_tokens=4).outputs[0].token_ids
        client.close()
