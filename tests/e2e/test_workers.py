"""Several BentoML workers: each holds its own engine; /metrics adds them up; tenants'
scopes hold on every worker and each worker enforces its share of a limit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from openllm_clone.testing import run_server
from tests.helpers import make_keys_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_workers_serve_forty_concurrent_requests(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    keys = make_keys_file(
        tmp_path / "keys.toml",
        {
            "ops": {"adapters": ["*"], "admin": True},
            "acme": {"adapters": ["alpha"], "base_model": False},
            "limited": {"requests_per_minute": 4},
        },
    )
    args = [str(tiny_model_dir), "--dtype", "float32", "--workers", "2", "--kv-cache-mb", "32"]
    args += ["--keys-file", str(tmp_path / "keys.toml")]
    args += ["--adapter-registry", str(tmp_path / "runtime-adapters.json")]
    for name, path in tiny_adapters.items():
        args += ["--adapter-id", f"{name}={path}"]
    names: list[str | None] = [None, *tiny_adapters]

    async def main(
        url: str,
    ) -> tuple[dict[str | None, list[int]], list[tuple[str | None, list[int]]]]:
        headers = {"Authorization": f"Bearer {keys['ops']}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:

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

    def h(tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[tenant]}"}

    with run_server(args, {}, tmp_path / "workers.log") as server:
        solo, results = asyncio.run(main(server.url))
        url = server.url
        # Scopes on every worker: 20 requests each way, all answered the same.
        scoped = [
            httpx.post(
                f"{url}/v1/generate",
                json={"prompt": "Workers share the load", "adapter_name": a, "max_new_tokens": 10},
                headers=h("acme"),
                timeout=120,
            )
            for a in ["alpha", "beta"] * 20
        ]
        # 4 requests a minute, split over two workers: each admits ceil(4 / 2) = 2.
        limited = [
            httpx.post(
                f"{url}/v1/generate",
                json={"prompt": "x", "max_new_tokens": 1},
                headers=h("limited"),
                timeout=120,
            )
            for _ in range(12)
        ]
        metrics = httpx.get(f"{url}/metrics", timeout=30, headers=h("ops")).text
        logs = server.logs()
        # An adapter posted at run time answers on both workers (gamma's weights, new name).
        posted = httpx.post(
            f"{url}/v1/adapters",
            json={"name": "late", "source": str(tiny_adapters["gamma"])},
            headers=h("ops"),
            timeout=120,
        )
        assert posted.status_code == 200, posted.text
        late = asyncio.run(_generate_many(url, h("ops"), "late", 40))
        failed = httpx.post(
            f"{url}/v1/adapters",
            json={"name": "broken", "source": str(tmp_path / "nowhere")},
            headers=h("ops"),
            timeout=120,
        )
        after_failed = asyncio.run(_generate_many(url, h("ops"), "broken", 10))
    assert all(status == 200 and tokens == solo["gamma"] for status, tokens in late), late
    assert failed.status_code in (400, 404, 422)
    assert {status for status, _ in after_failed} == {404}  # a failed load changed nothing
    # It survives a restart, and a DELETE reaches both workers.
    with run_server(args, {}, tmp_path / "workers-restart.log") as server:
        again = asyncio.run(_generate_many(server.url, h("ops"), "late", 20))
        deleted = httpx.delete(f"{server.url}/v1/adapters/late", headers=h("ops"), timeout=120)
        gone = asyncio.run(_generate_many(server.url, h("ops"), "late", 20))
        listed = httpx.get(f"{server.url}/v1/adapters", headers=h("ops"), timeout=30).json()
    assert all(status == 200 and tokens == solo["gamma"] for status, tokens in again)
    assert deleted.status_code == 200
    assert {status for status, _ in gone} == {404}
    assert "late" not in {a["name"] for a in listed["data"]}
    for r in scoped[0::2]:
        assert r.status_code == 200 and r.json()["outputs"][0]["token_ids"] == solo["alpha"]
    assert {(r.status_code, r.json()["error"]["message"]) for r in scoped[1::2]} == {
        (404, "adapter 'beta' is not loaded")
    }
    passed = [r for r in limited if r.status_code == 200]
    # 2 per worker that got its requests (the kernel picks the worker of each connection):
    # never more than the tenant's 4 in total.
    assert 2 <= len(passed) <= 4, [r.status_code for r in limited]
    assert all(
        r.status_code == 429 and "2 requests per minute" in r.json()["error"]["message"]
        for r in limited
        if r.status_code != 200
    )
    acme_ok = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("openllm_clone_tenant_requests_total{")
        and 'tenant="acme"' in line
        and 'status="ok"' in line
    )
    assert acme_ok == 20  # per-tenant counters added up across the workers
    for adapter, tokens in results:
        assert tokens == solo[adapter], adapter
    assert len({tuple(v) for v in solo.values()}) == len(names)  # adapters differ
    ok = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("openllm_clone_requests_total{") and 'status="ok"' in line
    )
    assert ok == 40 + len(names) + 20 + len(passed)  # counted across both workers
    workers = {
        json.loads(line.split("openllm_clone.requests: ", 1)[1])["worker"]
        for line in logs.splitlines()
        if "openllm_clone.requests: " in line
    }
    assert len(workers) == 2


async def _generate_many(
    url: str, headers: dict[str, str], adapter: str, n: int
) -> list[tuple[int, list[int]]]:
    """``n`` concurrent requests for ``adapter`` (so both workers get some)."""
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:

        async def one() -> tuple[int, list[int]]:
            body = {
                "prompt": "Workers share the load",
                "max_new_tokens": 10,
                "adapter_name": adapter,
            }
            r = await client.post(f"{url}/v1/generate", json=body)
            tokens = r.json()["outputs"][0]["token_ids"] if r.status_code == 200 else []
            return r.status_code, list(tokens)

        return list(await asyncio.gather(*(one() for _ in range(n))))
