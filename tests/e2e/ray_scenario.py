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
    parser.add_argument("--keys-file", help="tenants' keys file (tenant checks at the end)")
    parser.add_argument("--tenant-keys", help="JSON file: tenant -> key of --keys-file")
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
    if args.keys_file:
        server_args += ["--keys-file", args.keys_file]
    report: dict[str, Any] = {}
    started = time.monotonic()
    # OPENLLM_CLONE_API_KEY (from the test): the server's all-access admin key, which the
    # client library reads too.
    auth = {"Authorization": f"Bearer {os.environ['OPENLLM_CLONE_API_KEY']}"}
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
                f"{url}/v1/adapters",
                json={"name": "bad", "source": "/nonexistent/x"},
                timeout=60,
                headers=auth,
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
                headers=auth,
            )
            report["extra_after_unload"] = gone.status_code
            unknown = httpx.post(
                f"{url}/v1/generate",
                json={"prompt": PROMPT, "adapter_name": "nope"},
                timeout=60,
                headers=auth,
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
            metrics = httpx.get(f"{url}/metrics", timeout=30, headers=auth).text
            report["metrics_has_cache"] = "openllm_clone_adapter_cache_requests_total" in metrics
        if args.tenant_keys:
            keys = json.loads(Path(args.tenant_keys).read_text())
            report["tenants"] = _tenant_checks(url, keys, auth)
        report["router_restart"] = _router_restart(url, extra_dir, auth)
    report["server_alive_until_end"] = True
    Path(args.report).write_text(json.dumps(report))


def _router_restart(url: str, adapter_dir: str, auth: dict[str, str]) -> dict[str, Any]:
    """Load an adapter at run time, SIGKILL the router (Ray Serve starts a new one), and
    serve the adapter again: the registration outlives the router."""
    r = httpx.post(
        f"{url}/v1/adapters",
        json={"name": "zeta", "source": adapter_dir},
        headers=auth,
        timeout=120,
    )
    out: dict[str, Any] = {"loaded": r.status_code}
    routers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline") as fh:
                    if "ServeReplica:openllm-clone:Router" in fh.read():
                        routers.append(int(entry))
            except OSError:
                continue
    out["routers"] = routers
    for pid in routers:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 180:
        try:
            if httpx.get(f"{url}/v1/models", headers=auth, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    out["recovered_s"] = round(time.monotonic() - t0, 1)
    listed = httpx.get(f"{url}/v1/adapters", headers=auth, timeout=30).json()["data"]
    out["listed"] = "zeta" in {a["name"] for a in listed}
    g = httpx.post(
        f"{url}/v1/generate",
        json={"prompt": PROMPT, "adapter_name": "zeta", "max_new_tokens": 12},
        headers=auth,
        timeout=120,
    )
    out["status"] = g.status_code
    out["tokens"] = g.json()["outputs"][0]["token_ids"] if g.status_code == 200 else g.text
    return out


def _tenant_checks(url: str, keys: dict[str, str], admin: dict[str, str]) -> dict[str, Any]:
    """Scopes, limits and usage through the router (the acme/limited/thrifty keys)."""
    out: dict[str, Any] = {}

    def h(tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[tenant]}"}

    def completion(tenant: str, model: str, max_tokens: int = 4) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, headers=h(tenant), timeout=60)

    out["acme_models"] = [
        m["id"] for m in httpx.get(f"{url}/v1/models", headers=h("acme"), timeout=30).json()["data"]
    ]
    out["acme_adapters"] = [
        a["name"]
        for a in httpx.get(f"{url}/v1/adapters", headers=h("acme"), timeout=30).json()["data"]
    ]
    out["out_of_scope"] = [[r.status_code, r.json()] for r in (completion("acme", "beta"),)]
    out["missing"] = [[r.status_code, r.json()] for r in (completion("acme", "nope"),)]
    base = completion("acme", "tiny-llama")
    out["base"] = [base.status_code, base.json()["error"]["type"]]
    told = [0, 0, 0]
    for _ in range(3):
        r = completion("acme", "alpha", 12)
        usage = r.json()["usage"]
        told = [told[0] + 1, told[1] + usage["prompt_tokens"], told[2] + usage["completion_tokens"]]
    r = httpx.post(
        f"{url}/v1/generate",
        json={"prompt": PROMPT, "adapter_name": "alpha", "max_new_tokens": 12},
        headers=h("acme"),
        timeout=60,
    )
    out["acme_alpha_tokens"] = r.json()["outputs"][0]["token_ids"]
    usage = r.json()["usage"]
    told = [told[0] + 1, told[1] + usage["prompt_tokens"], told[2] + usage["completion_tokens"]]
    out["acme_told"] = told
    out["limited"] = []
    for _ in range(3):
        r = completion("limited", "tiny-llama", 1)
        out["limited"].append([r.status_code, r.headers.get("x-ratelimit-remaining-requests")])
    out["thrifty"] = []
    for _ in range(6):
        r = completion("thrifty", "tiny-llama", 8)
        out["thrifty"].append(r.status_code)
        if r.status_code == 429:
            out["thrifty_error"] = r.json()["error"]["message"]
            break
    # A stream its client hangs up on: the replica reports its tokens to the router.
    body = {
        "model": "alpha",
        "prompt": PROMPT,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=h("canceller"), timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # hang up after the first token
    row: dict[str, Any] = {}
    for _ in range(300):
        usage = httpx.get(f"{url}/v1/usage", headers=admin, timeout=30).json()
        row = usage["tenants"].get("canceller", {}).get("adapters", {}).get("alpha", {})
        if row.get("cancelled"):
            break
        time.sleep(0.2)
    out["cancelled"] = row
    out["usage"] = httpx.get(f"{url}/v1/usage", headers=admin, timeout=30).json()
    out["usage_by_acme"] = httpx.get(f"{url}/v1/usage", headers=h("acme"), timeout=30).status_code
    return out


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
