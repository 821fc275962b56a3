"""Many customers on one server: scoped keys from a keys file, per-tenant limits, usage.

A real server on the tiny model with adapters alpha, beta and gamma; a keys file written
by the same code `openllm-clone keys` uses; the openai SDK, httpx and TGI's route shapes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from openllm_clone.limits import summarize_usage
from openllm_clone.tenants import KeyEntry, hash_key, load_keys, new_key, save_keys
from openllm_clone.testing import Server, run_server
from tests.helpers import make_keys_file, run_cli

pytestmark = pytest.mark.e2e

KEYS: dict[str, str] = {}  # tenant -> key
SCOPES: dict[str, dict[str, Any]] = {
    "acme": {"adapters": ["alpha", "gam*"]},
    "globex": {"adapters": ["beta"], "base_model": False, "max_tokens": 8},
    "limited": {"requests_per_minute": 3},
    "thrifty": {"tokens_per_minute": 40},
    "single": {"max_concurrent": 1},
    "canceller": {"adapters": ["alpha"]},
    "ops": {"admin": True, "adapters": ["*"]},
}


def _entry(tenant: str, **fields: Any) -> tuple[KeyEntry, str]:
    key_id, key = new_key()
    return KeyEntry(tenant=tenant, key_id=key_id, key_hash=hash_key(key), **fields), key


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    KEYS.update(make_keys_file(path, SCOPES))
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_adapters: dict[str, Path],
    keys_file: Path,
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "tenants.log"
    args = [
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--max-batch-size",
        "8",
        "--kv-cache-mb",
        "64",
        "--keys-file",
        str(keys_file),
        "--usage-log",
        str(keys_file.parent / "usage.jsonl"),
        *(f"--adapter-id={n}={tiny_adapters[n]}" for n in ("alpha", "beta", "gamma")),
    ]
    with run_server(args, {}, log) as s:
        yield s


def _h(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _sdk(server: Server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[tenant], max_retries=0)


def _error(r: httpx.Response) -> tuple[int, Any]:
    return r.status_code, r.json()


def test_models_list_what_the_key_may_use(server: Server) -> None:
    assert [m.id for m in _sdk(server, "acme").models.list()] == ["tiny-llama", "alpha", "gamma"]
    assert [m.id for m in _sdk(server, "globex").models.list()] == ["beta"]
    assert {m.id for m in _sdk(server, "ops").models.list()} == {
        "tiny-llama",
        "alpha",
        "beta",
        "gamma",
    }
    names = [
        a["name"] for a in httpx.get(f"{server.url}/v1/adapters", headers=_h("acme")).json()["data"]
    ]
    assert names == ["alpha", "gamma"]
    meta = httpx.get(f"{server.url}/v1/metadata", headers=_h("globex")).json()
    assert meta["adapters"] == ["beta"] and meta["config"]["scheduling"] == "fair"


def test_out_of_scope_adapters_answer_as_missing_ones(server: Server) -> None:
    """beta exists but is not acme's: every route answers as for a name that does not exist."""
    url = server.url

    def both(method: str, path: str, body_of: Any) -> None:
        got = [
            _error(httpx.request(method, f"{url}{path}", json=body_of(name), headers=_h("acme")))
            for name in ("beta", "no-such")
        ]
        assert got[0][0] == got[1][0] and got[0][0] in (404, 422), (path, got)
        assert json.dumps(got[0][1]).replace("beta", "X") == json.dumps(got[1][1]).replace(
            "no-such", "X"
        ), (path, got)

    both("POST", "/v1/completions", lambda n: {"model": n, "prompt": "hi", "max_tokens": 2})
    both(
        "POST",
        "/v1/chat/completions",
        lambda n: {"model": n, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    both("POST", "/v1/generate", lambda n: {"prompt": "hi", "adapter_name": n, "max_new_tokens": 2})
    both(
        "POST",
        "/v1/generate",
        lambda n: {"prompt": "hi", "merged_adapters": {"ids": ["alpha", n], "weights": [1, 1]}},
    )
    both("POST", "/generate", lambda n: {"inputs": "hi", "parameters": {"adapter_id": n}})
    with pytest.raises(openai.NotFoundError):
        _sdk(server, "acme").completions.create(model="beta", prompt="hi", max_tokens=2)
    # In scope: served.
    ok = _sdk(server, "acme").completions.create(model="gamma", prompt="hi", max_tokens=2)
    assert ok.model == "gamma" and ok.usage.completion_tokens == 2


def test_adapter_only_key_and_its_max_tokens(server: Server) -> None:
    sdk = _sdk(server, "globex")
    with pytest.raises(openai.PermissionDeniedError, match="base model"):
        sdk.completions.create(model="tiny-llama", prompt="hi", max_tokens=2)
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": "hi"}, headers=_h("globex"))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
    with pytest.raises(openai.BadRequestError, match="at most 8 tokens"):
        sdk.completions.create(model="beta", prompt="hi", max_tokens=9)
    # No max_tokens given: the route's default is lowered to the key's cap.
    chat = sdk.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"


def test_requests_per_minute_give_429_with_openai_headers(server: Server) -> None:
    seen = []
    for _ in range(3):
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 1},
            headers=_h("limited"),
        )
        assert r.status_code == 200
        seen.append(r.headers["x-ratelimit-remaining-requests"])
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert seen == ["2", "1", "0"]
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 1},
        headers=_h("limited"),
    )
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    with pytest.raises(openai.RateLimitError):
        _sdk(server, "limited").completions.create(model="tiny-llama", prompt="hi", max_tokens=1)
    # TGI's routes answer in TGI's shape, which its client maps to its own error.
    from text_generation import Client
    from text_generation.errors import RateLimitExceededError

    t = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "hi", "parameters": {"max_new_tokens": 1}},
        headers=_h("limited"),
    )
    assert t.status_code == 429 and t.json()["error_type"] == "rate_limit_exceeded"
    with pytest.raises(RateLimitExceededError):
        Client(server.url, headers=_h("limited")).generate("hi", max_new_tokens=1)
    # Reading routes do not count, and still say where the tenant stands.
    m = httpx.get(f"{server.url}/v1/models", headers=_h("limited"))
    assert m.status_code == 200 and m.headers["x-ratelimit-remaining-requests"] == "0"
    # Another tenant is not affected.
    assert _sdk(server, "acme").completions.create(model="tiny-llama", prompt="x", max_tokens=1)


def test_tokens_per_minute_count_prompt_and_completion(server: Server) -> None:
    sdk = _sdk(server, "thrifty")
    used = 0
    while used < 40:
        out = sdk.completions.create(model="tiny-llama", prompt="hello there", max_tokens=8)
        used += out.usage.total_tokens
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        sdk.completions.create(model="tiny-llama", prompt="hi", max_tokens=1)
    r = httpx.get(f"{server.url}/v1/models", headers=_h("thrifty"))
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert r.headers["x-ratelimit-limit-tokens"] == "40"


def test_concurrency_limit_and_its_recovery(server: Server) -> None:
    body = {
        "model": "tiny-llama",
        "prompt": "hi",
        "max_tokens": 48,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=_h("single"), timeout=60
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        second = httpx.post(f"{server.url}/v1/completions", json=body, headers=_h("single"))
        assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
        assert any(line == "data: [DONE]" for line in lines)
    again = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2},
        headers=_h("single"),
    )
    assert again.status_code == 200


def test_usage_equals_what_clients_were_told(server: Server, keys_file: Path) -> None:
    """200 mixed requests (two tenants, base and adapters, streams and not, bad ones), and
    cancelled streams under a third tenant: /v1/usage per tenant and adapter equals the
    usage blocks the clients received; the cancelled ones are counted as cancelled."""
    before = httpx.get(f"{server.url}/v1/usage", headers=_h("ops")).json()["tenants"]
    told: dict[tuple[str, str], list[int]] = {}
    plan = [
        ("acme", "tiny-llama"),
        ("acme", "alpha"),
        ("acme", "gamma"),
        ("globex", "beta"),
    ]

    async def run() -> None:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(i: int) -> None:
                tenant, model = plan[i % len(plan)]
                body: dict[str, Any] = {
                    "model": model,
                    "prompt": f"item {i}",
                    "max_tokens": 1 + i % 6,
                }
                if i % 10 == 9:
                    body["max_tokens"] = -1  # refused before the engine: no usage
                stream = i % 3 == 0
                if stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                async with sem:
                    if not stream:
                        r = await client.post("/v1/completions", json=body, headers=_h(tenant))
                        if r.status_code != 200:
                            assert r.status_code == 400
                            return
                        usage = r.json()["usage"]
                    else:
                        usage = None
                        async with client.stream(
                            "POST", "/v1/completions", json=body, headers=_h(tenant)
                        ) as r:
                            if r.status_code != 200:
                                await r.aread()
                                assert r.status_code == 400
                                return
                            async for line in r.aiter_lines():
                                if line.startswith("data: {"):
                                    event = json.loads(line[6:])
                                    usage = event.get("usage") or usage
                    row = told.setdefault(
                        (tenant, "" if model == "tiny-llama" else model), [0, 0, 0]
                    )
                    row[0] += 1
                    row[1] += usage["prompt_tokens"]
                    row[2] += usage["completion_tokens"]

            async def cancelled(i: int) -> None:
                body = {
                    "model": "alpha",
                    "prompt": f"c {i}",
                    "max_tokens": 64,
                    "stream": True,
                    "ignore_eos": True,
                }
                async with client.stream(
                    "POST", "/v1/completions", json=body, headers=_h("canceller")
                ) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            break  # hang up after the first token

            await asyncio.gather(*(one(i) for i in range(200)), *(cancelled(i) for i in range(5)))

    asyncio.run(run())
    # The cancelled streams finish in the engine shortly after the hang-up.
    deadline = 0
    while True:
        usage = httpx.get(f"{server.url}/v1/usage", headers=_h("ops")).json()["tenants"]
        done = usage.get("canceller", {}).get("requests", 0) - before.get("canceller", {}).get(
            "requests", 0
        )
        if done >= 5 or deadline > 60:
            break
        deadline += 1
        threading.Event().wait(1)
    for (tenant, adapter), (requests, prompt, completion) in told.items():
        now = usage[tenant]["adapters"][adapter or "(base)"]
        then = before.get(tenant, {}).get("adapters", {}).get(adapter or "(base)", {})
        assert now["requests"] - then.get("requests", 0) == requests, (tenant, adapter)
        assert now["prompt_tokens"] - then.get("prompt_tokens", 0) == prompt, (tenant, adapter)
        assert now["completion_tokens"] - then.get("completion_tokens", 0) == completion
    c = usage["canceller"]["adapters"]["alpha"]
    assert (
        c["cancelled"]
        - before.get("canceller", {}).get("adapters", {}).get("alpha", {}).get("cancelled", 0)
        == 5
    )
    # Per-tenant metrics exist, keyed by tenant and adapter.
    metrics = httpx.get(f"{server.url}/metrics", headers=_h("ops")).text
    assert (
        'openllm_clone_tenant_requests_total{adapter="beta",status="ok",tenant="globex"}' in metrics
    )
    assert (
        'openllm_clone_tenant_time_to_first_token_seconds_count{adapter="beta",tenant="globex"}'
        in metrics
    )
    # Only an admin key reads usage.
    assert httpx.get(f"{server.url}/v1/usage", headers=_h("acme")).status_code == 403
    # The usage log (fsynced within a second) sums to the same totals, and the CLI reads it.
    log = keys_file.parent / "usage.jsonl"
    for _ in range(50):
        rows = summarize_usage(str(log)) if log.exists() else []
        if sum(r["requests"] for r in rows) == sum(t["requests"] for t in usage.values()):
            break
        threading.Event().wait(0.2)
    for tenant, totals in usage.items():
        mine = [r for r in rows if r["tenant"] == tenant]
        for key in ("requests", "prompt_tokens", "completion_tokens", "cancelled", "errors"):
            assert sum(r[key] for r in mine) == totals[key], (tenant, key)
    cli = run_cli("usage", str(log), "--json")
    assert cli.returncode == 0 and "globex" in cli.stdout


def test_keys_file_edits_apply_without_restart(server: Server, keys_file: Path) -> None:
    """A key added to the file works at once; a revoked key is refused at once, while a
    stream it started before goes on to the end."""
    entry, key = _entry("newco", adapters=["alpha"])
    body = {
        "model": "tiny-llama",
        "prompt": "hi",
        "max_tokens": 64,
        "stream": True,
        "ignore_eos": True,
    }
    events: list[str] = []

    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=_h("acme"), timeout=120
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        save_keys(str(keys_file), [*load_keys(str(keys_file)), entry])
        added = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "alpha", "prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert added.status_code == 200, added.text
        # Revoke acme while its stream runs.
        save_keys(str(keys_file), [e for e in load_keys(str(keys_file)) if e.tenant != "acme"])
        refused = httpx.get(f"{server.url}/v1/models", headers=_h("acme"))
        assert refused.status_code == 401
        events.extend(line for line in lines if line.startswith("data: "))
    assert events[-1] == "data: [DONE]"
    tokens = sum(len(json.loads(e[6:])["choices"][0]["text"]) > 0 for e in events[:-1])
    assert tokens > 1


def test_sighup_rereads_the_keys_file_without_restarting(server: Server, keys_file: Path) -> None:
    """An edit a ``stat`` cannot see (same size, inode and modification time, as a copy
    that keeps times) applies on SIGHUP, and the workers go on (BentoML's process manager
    would restart them all on SIGHUP)."""
    entry, old = _entry("rotated", adapters=["alpha"])
    save_keys(str(keys_file), [*load_keys(str(keys_file)), entry])

    def status(key: str) -> int:
        return httpx.get(
            f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code

    assert status(old) == 200
    workers = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    # Rotate the key in place: same id, a new secret, a hash of the same length.
    new = f"oc-{entry.key_id}-{new_key()[1].split('-', 2)[2]}"
    before = os.stat(keys_file)
    text = keys_file.read_text()
    edited = text.replace(entry.key_hash, hash_key(new))
    assert len(edited) == len(text) and edited != text
    with open(keys_file, "r+") as fh:
        fh.write(edited)
    os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(keys_file)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        before.st_size,
        before.st_ino,
        before.st_mtime_ns,
    )
    assert status(old) == 200  # nothing a stat can see changed
    server.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if status(old) == 401:
            break
        threading.Event().wait(0.2)
    assert status(old) == 401 and status(new) == 200
    assert {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)} == workers
    assert "SIGHUP: re-reading keys file" in server.logs()


def test_nothing_of_the_keys_file_comes_back(server: Server, keys_file: Path) -> None:
    secrets = list(KEYS.values()) + [e.key_hash for e in load_keys(str(keys_file))]
    seen = [
        httpx.get(f"{server.url}{p}", headers=_h("ops")).text
        for p in ("/v1/metadata", "/metrics", "/v1/usage", "/v1/models")
    ]
    seen.append(server.logs())
    for text in seen:
        for secret in secrets:
            assert secret not in text
            assert secret.split("$")[-1] not in text


def test_limits_recover_after_their_window(server: Server) -> None:
    """Last in the module: the minute windows that the limit tests above spent free up a
    minute after their use (the 429s say when), and the same keys are served again."""
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}
    deadline = time.monotonic() + 120
    for tenant, remaining in (
        ("limited", "x-ratelimit-remaining-requests"),
        ("thrifty", "x-ratelimit-remaining-tokens"),
    ):
        while True:
            r = httpx.post(f"{server.url}/v1/completions", json=body, headers=_h(tenant))
            if r.status_code != 429:
                break
            assert time.monotonic() < deadline, r.headers
            threading.Event().wait(float(r.headers["retry-after"]))
        assert r.status_code == 200, r.text
        # Admitted: room in the window, though requests made later than the one that
        # just left it may still be there (remaining 0 for limited's 3 a minute).
        assert int(r.headers[remaining]) >= 0
    # Of limited's 3 requests a minute, once the older ones have left the window (each a
    # minute after it was made), the one just made is the only one in it.
    while True:
        left = httpx.get(f"{server.url}/v1/models", headers=_h("limited")).headers[
            "x-ratelimit-remaining-requests"
        ]
        if left == "2":
            break
        assert left in ("0", "1") and time.monotonic() < deadline + 60, left
        threading.Event().wait(0.5)
