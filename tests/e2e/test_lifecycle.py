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
