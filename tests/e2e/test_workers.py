"""Several BentoML workers: each holds its own engine; /metrics adds them up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from openllm_clone.testing import run_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_workers_serve_forty_concurrent_requests(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    args = [str(tiny_model_dir), "--dtype", "float32", "--workers", "2", "--kv-cache-mb", "32"]
    for name, path in tiny_adapters.items():
        args += ["--adapter-id", f"{name}={path}"]
    names: list[str | None] = [None, *tiny_adapters]

    async def main(
        url: str,
    ) -> tuple[dict[str | None, list[int]], list[tuple[str | None, list[int]]]]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(adapter: str | None) -> list[int]:
                body: dict[str, object] = {"prompt": "Workers share the load", "max_new_tokens": 10}
                if adapter:
                    body["adapter_name"] = adapter
                r = await client.post(f"{url}/v1/generate", json=body)
                assert r.status_code == 200, r.text
                return list(r.json()["outputs"][0]["token_ids"])

            solo = {n: await one(n) for n in names}
            plan = [names[i % len(names)] for i in range(40)]
            results = await asyncio.gather(*(one(n) for n in plan))
            return solo, list(zip(plan, results))

    with run_server(args, {}, tmp_path / "workers.log") as server:
        solo, results = asyncio.run(main(server.url))
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        logs = server.logs()
    for adapter, tokens in results:
        assert tokens == solo[adapter], adapter
    assert len({tuple(v) for v in solo.values()}) == len(names)  # adapters differ
    ok = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("openllm_clone_requests_total{") and 'status="ok"' in line
    )
    assert ok == 40 + len(names)  # counted across both workers
    workers = {
        json.loads(line.split("openllm_clone.requests: ", 1)[1])["worker"]
        for line in logs.splitlines()
        if "openllm_clone.requests: " in line
    }
    assert len(workers) == 2
