"""The Ray Serve scenario, run by ``test_ray.py`` inside a loopback-only network namespace.

Ray opens listeners on every interface, so this whole script (server and client) runs
under ``unshare --net`` with only ``lo`` up; it writes what it saw to a JSON report
that the test checks. Run by hand::

    unshare --net bash -c 'ip link set lo up && python -m tests.e2e.ray_scenario \\
        --model DIR --adapter alpha=DIR ... --report out.json --log server.log'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from openllm_clone.client import APIStatusError, AsyncHTTPClient, HTTPClient
from openllm_clone.testing import run_server

PROMPT = "Replicas share the load"


async def _round(
    url: str, plan: list[str | None], max_new_tokens: int, kill: tuple[int, str] | None = None
) -> tuple[list[list[int]], dict[str, Any]]:
    """Send ``plan`` concurrently (retries on). With ``kill=(pid, adapter)``, first open a
    long stream for ``adapter`` (held only by the replica ``pid``), start the round, and
    SIGKILL ``pid`` as soon as that stream has yielded a token: the victim then certainly
    holds a request mid-stream (and likely some of the round's). Returns the token ids per
    request and what the killed stream saw."""
    finished = 0
    seen: dict[str, Any] = {}

    async with AsyncHTTPClient(url, timeout=120, max_retries=6) as client:

        async def one(adapter: str | None) -> list[int]:
            nonlocal finished
            r = await client.generate(PROMPT, adapter_name=adapter, max_new_tokens=max_new_tokens)
            finished += 1
            return list(r.outputs[0].token_ids)

        if kill is None:
            return list(await asyncio.gather(*(one(a) for a in plan))), seen
        pid, adapter = kill
        events = 0
        stream = client.generate_stream(
            PROMPT, adapter_name=adapter, max_new_tokens=400, ignore_eos=True
        )
        tasks: list[asyncio.Task[list[int]]] = []
        try:
            async for _ in stream:
                events += 1
                if events == 1:
                    tasks = [asyncio.create_task(one(a)) for a in plan]
                    await asyncio.sleep(0.2)  # the round's requests reach the replicas
                    seen["done_at_kill"] = finished
                    os.kill(pid, signal.SIGKILL)
            seen["stream"] = {"events": events, "error": None}
        except APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            seen["stream"] = {
                "events": events,
                "error": [exc.status_code, body.get("error", {}).get("type")],
            }
        results = list(await asyncio.gather(*tasks))
    return results, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--extra-adapter", required=True, help="NAME=DIR loaded at run time")
    parser.add_argument("--report", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    names: list[str | None] = [None, *(a.split("=", 1)[0] for a in args.adapter)]
    server_args = [
        args.model,
        "--backend",
        "ray",
        "--replicas",
        "2",
        "--cpus-per-replica",
        "1",
        "--dtype",
        "float32",
        "--kv-cache-mb",
        "32",
        "--max-adapters",
        "4",
    ]
    for spec in args.adapter:
        server_args += ["--adapter-id", spec]
    report: dict[str, Any] = {}
    started = time.monotonic()
    with run_server(server_args, {}, Path(args.log), ready_timeout=240) as server:
        report["ready_s"] = round(time.monotonic() - started, 1)
        url = server.url
        with HTTPClient(url, timeout=120) as client:
            # Warm-up: one request per adapter, one after another, so that each adapter
            # is loaded once and Ray learns where it lives.
            report["solo"] = {
                str(n): list(
                    client.generate(PROMPT, adapter_name=n, max_new_tokens=12).outputs[0].token_ids
                )
                for n in names
            }
            time.sleep(1.0)
            before = client.metadata()["routing"]
            plan = [names[i % len(names)] for i in range(40)]
            results, _ = asyncio.run(_round(url, plan, 12))
            report["concurrent"] = [[str(n), r] for n, r in zip(plan, results)]
            routing = client.metadata()["routing"]
            report["routing_before"] = before
            report["routing_after_steady"] = routing

            # Run-time adapters reach every replica; bad ones are refused; unload works.
            extra_name, extra_dir = args.extra_adapter.split("=", 1)
            bad = httpx.post(
                f"{url}/v1/adapters", json={"name": "bad", "source": "/nonexistent/x"}, timeout=60
            )
            report["bad_load"] = [bad.status_code, bad.json()]
            loaded = client.load_adapter(extra_name, extra_dir)
            report["extra_loaded"] = loaded
            report["extra_outputs"] = [
                list(r.outputs[0].token_ids)
                for r in asyncio.run(_gather_generate(url, extra_name, 6))
            ]
            report["extra_listed"] = [a["name"] for a in client.list_adapters()]
            report["extra_unload"] = client.unload_adapter(extra_name)
            gone = httpx.post(
                f"{url}/v1/generate",
                json={"prompt": PROMPT, "adapter_name": extra_name},
                timeout=60,
            )
            report["extra_after_unload"] = gone.status_code
            unknown = httpx.post(
                f"{url}/v1/generate", json={"prompt": PROMPT, "adapter_name": "nope"}, timeout=60
            )
            report["unknown_adapter"] = [unknown.status_code, unknown.json()]
            chat = client.chat([{"role": "user", "content": "hi"}], model=names[1], max_tokens=4)
            report["chat_model"] = chat["model"]
            stream = list(
                client.chat_stream(
                    [{"role": "user", "content": "hi"}], model=names[2], max_tokens=4
                )
            )
            report["chat_stream_events"] = len(stream)

            # Kill one replica while it streams and 40 requests run: the client retries
            # what failed before it returned anything; the cut stream ends in an error.
            pids = routing["replica_pids"]
            victim_replica = sorted(
                r for r, held in routing["adapters_by_replica"].items() if held
            )[0]
            victim_adapter = sorted(routing["adapters_by_replica"][victim_replica])[0]
            victim = pids[victim_replica]
            plan = [names[i % len(names)] for i in range(40)]
            t0 = time.monotonic()
            results, seen = asyncio.run(_round(url, plan, 48, kill=(victim, victim_adapter)))
            report["kill"] = {
                "victim_pid": victim,
                "victim_adapter": victim_adapter,
                **seen,
                "seconds": round(time.monotonic() - t0, 1),
                "results": [[str(n), r] for n, r in zip(plan, results)],
            }
            report["solo48"] = {
                str(n): list(
                    client.generate(PROMPT, adapter_name=n, max_new_tokens=48).outputs[0].token_ids
                )
                for n in names
            }
            report["routing_after_kill"] = client.metadata()["routing"]
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
            report["metrics_has_cache"] = "openllm_clone_adapter_cache_requests_total" in metrics
    report["server_alive_until_end"] = True
    Path(args.report).write_text(json.dumps(report))


async def _gather_generate(url: str, adapter: str, n: int) -> list[Any]:
    async with AsyncHTTPClient(url, timeout=120) as client:
        return list(
            await asyncio.gather(
                *(
                    client.generate(PROMPT, adapter_name=adapter, max_new_tokens=12)
                    for _ in range(n)
                )
            )
        )


if __name__ == "__main__":
    main()
