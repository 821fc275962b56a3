"""Keys files, key hashing and scopes, and the per-tenant rate limiter (no server)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from openllm_clone.errors import InvalidRequestError, RateLimitError
from openllm_clone.limits import AdapterLabels, RateLimiter, UsageMeter
from openllm_clone.tenants import KeyEntry, KeysFile, hash_key, new_key, save_keys, verify_key


def entry(tenant: str = "acme", **limits: object) -> tuple[KeyEntry, str]:
    key_id, key = new_key()
    return KeyEntry(tenant=tenant, key_id=key_id, key_hash=hash_key(key), **limits), key  # type: ignore[arg-type]


def test_keys_are_stored_hashed_and_verified() -> None:
    key_id, key = new_key()
    stored = hash_key(key)
    assert key not in stored and key_id in key
    assert verify_key(key, stored)
    assert not verify_key(key + "x", stored)
    assert hash_key(key) != stored  # a fresh salt each time


def test_scopes_take_names_and_globs() -> None:
    e, _ = entry(adapters=["acme-*", "shared"], base_model=False)
    assert e.may_use("acme-legal") and e.may_use("shared")
    assert not e.may_use("other") and not e.may_use("acme")
    assert not e.may_use(None)  # the base model


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_keys_file_round_trip_and_reload_on_change(tmp_path: Path, suffix: str) -> None:
    path = str(tmp_path / f"keys{suffix}")
    a, key_a = entry("acme", adapters=["acme-*"], requests_per_minute=5, weight=2.0)
    save_keys(path, [a])
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert key_a not in Path(path).read_text()
    keys = KeysFile(path)
    assert keys.authenticate(key_a) == a
    assert keys.authenticate("oc-00000000-" + "x" * 32) is None
    assert keys.authenticate("not a key") is None
    b, key_b = entry("globex")
    save_keys(path, [a, b])
    assert keys.authenticate(key_b) == b  # picked up without a restart
    save_keys(path, [b])
    assert keys.authenticate(key_a) is None  # revoked at once
    # A broken edit keeps the last good table in force.
    Path(path).write_text("this is [[ not valid")
    assert keys.authenticate(key_b) == b


def test_a_bad_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\ntenant = "a"\nkey_id = "1"\nkey_hash = "plain"\n')
    with pytest.raises(InvalidRequestError, match="key_hash"):
        KeysFile(str(path))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_slide_and_say_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    e, _ = entry(requests_per_minute=2)
    t1, headers = limiter.admit(e)
    assert ("x-ratelimit-remaining-requests", "1") in headers
    clock.now += 10
    limiter.admit(e)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(e)
    assert info.value.status_code == 429
    assert info.value.retry_after == pytest.approx(50.0)  # the first request leaves the window
    assert ("x-ratelimit-remaining-requests", "0") in info.value.headers
    clock.now += 50.5
    limiter.admit(e)  # room again
    other, _ = entry("globex", requests_per_minute=2)
    limiter.admit(other)  # tenants do not share counters


def test_tokens_per_minute_count_finished_requests() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    e, _ = entry(tokens_per_minute=100)
    limiter.admit(e)
    limiter.record_tokens("acme", 60)
    limiter.admit(e)
    limiter.record_tokens("acme", 60)
    with pytest.raises(RateLimitError, match="tokens per minute"):
        limiter.admit(e)
    clock.now += 61
    _, headers = limiter.admit(e)
    assert ("x-ratelimit-remaining-tokens", "100") in headers


def test_concurrency_is_released_with_the_ticket() -> None:
    limiter = RateLimiter()
    e, _ = entry(max_concurrent=1)
    ticket, _ = limiter.admit(e)
    with pytest.raises(RateLimitError, match="concurrent"):
        limiter.admit(e)
    ticket.release()
    ticket.release()  # idempotent
    limiter.admit(e)


def test_workers_split_each_limit() -> None:
    e, _ = entry(requests_per_minute=5)
    limiter = RateLimiter(share=0.5)
    for _ in range(3):  # ceil(5 / 2)
        limiter.admit(e)
    with pytest.raises(RateLimitError, match="3 requests per minute"):
        limiter.admit(e)
    c, _ = entry("globex", max_concurrent=3)
    for _ in range(2):  # ceil(3 / 2)
        limiter.admit(c)
    with pytest.raises(RateLimitError, match="2 concurrent"):
        limiter.admit(c)


def test_usage_meter_totals() -> None:
    meter = UsageMeter()
    meter.record("acme", "legal", "ok", 10, 5)
    meter.record("acme", None, "error", 3, 0)
    meter.record("globex", "x", "ok", 1, 1)
    snap = meter.snapshot()["tenants"]
    assert snap["acme"]["requests"] == 2 and snap["acme"]["errors"] == 1
    assert snap["acme"]["total_tokens"] == 18
    assert snap["acme"]["adapters"]["legal"]["completion_tokens"] == 5
    assert snap["acme"]["adapters"]["(base)"]["prompt_tokens"] == 3


def test_usage_log_lines_from_two_writers_sum_per_day(tmp_path: Path) -> None:
    """Two workers' meters append to one log; it holds every request once, and the daily
    summary adds up as the meters do. Unflushed lines reach the file within a second."""
    import time as _time

    from openllm_clone.limits import UsageLog, summarize_usage

    path = str(tmp_path / "usage.jsonl")
    a, b = UsageMeter(UsageLog(path, flush_every=0.2)), UsageMeter(UsageLog(path, flush_every=0.2))
    for i in range(50):
        (a if i % 2 else b).record("acme", "legal" if i % 3 else None, "ok", 10, i)
    a.record("globex", "x", "cancelled", 4, 1)
    b.record("globex", "x", "error", 4, 0)
    log = Path(path)
    for _ in range(100):
        if log.exists() and len(log.read_text().splitlines()) == 52:
            break
        _time.sleep(0.05)
    rows = summarize_usage(path)
    assert sum(r["requests"] for r in rows) == 52
    acme = [r for r in rows if r["tenant"] == "acme"]
    assert sum(r["completion_tokens"] for r in acme) == sum(range(50))
    assert sum(r["prompt_tokens"] for r in acme) == 500
    globex = [r for r in rows if r["tenant"] == "globex"]
    assert globex == [
        {
            "day": globex[0]["day"],
            "tenant": "globex",
            "adapter": "x",
            "requests": 2,
            "errors": 1,
            "cancelled": 1,
            "prompt_tokens": 8,
            "completion_tokens": 1,
        }
    ]


async def test_arrivals_count_requests_until_they_reach_the_engine(monkeypatch: Any) -> None:
    """The guard middleware's count of generation requests on their way to the engine:
    per tenant, ended once by reaching the engine or by the request's end, in the
    request's own context only; requests older than RECENT_S no longer count."""
    from openllm_clone import arrivals

    assert arrivals.pending() == 0
    reached_b = asyncio.Event()

    async def request(tenant: str | None, reach: bool, done: asyncio.Event) -> None:
        with arrivals.arriving(tenant):
            await asyncio.sleep(0)
            if reach:
                arrivals.reached()
                arrivals.reached()  # once only
                reached_b.set()
            await done.wait()

    done_a, done_b = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(request("a", False, done_a))
    b = asyncio.create_task(request(None, True, done_b))
    await reached_b.wait()
    assert arrivals.pending() == 1 and arrivals.pending_tenants() == {"a"}
    arrivals.reached()  # outside any request: nothing
    assert arrivals.pending() == 1
    with monkeypatch.context() as m:  # a's request, waiting too long, is not waited for
        m.setattr(arrivals, "RECENT_S", 0.0)
        assert arrivals.pending() == 0 and arrivals.pending_tenants() == set()
    done_a.set()
    await a
    assert arrivals.pending() == 0 and arrivals.pending_tenants() == set()
    done_b.set()
    await b
    assert arrivals.pending() == 0


def test_adapter_labels_follow_traffic_within_a_bound() -> None:
    labels = AdapterLabels(capacity=3)
    counted: dict[str, int] = {}  # label value -> tokens, as the Prometheus counters add up
    sent: dict[str, int] = {}

    def request(adapter: str | None, tokens: int) -> str:
        value = labels.record(adapter, tokens)
        counted[value] = counted.get(value, 0) + tokens
        sent[adapter or ""] = sent.get(adapter or "", 0) + tokens
        return value

    # The first three (the base model among them) take the labels; the fourth is "other".
    assert [request(a, 10) for a in (None, "a", "b", "c")] == ["", "a", "b", "other"]
    assert labels.label("c") == "other" and labels.label("a") == "a"
    # "c" becomes the busiest: once it has twice the least-used label's traffic it takes it.
    assert request("c", 5) == "other"  # 15 < 2 * 10
    assert request("c", 5) == "c"  # 20 >= 2 * 10: displaces the least used ("", then "a")
    assert labels.labelled() == {"a", "b", "c"}
    assert request(None, 1) == "other"  # the displaced one's traffic counts as "other"
    # The label values always add up to everything sent.
    assert sum(counted.values()) == sum(sent.values())
    # A churn of adapters never gives more than 2 * capacity values (+ "other").
    for i in range(100):
        request(f"n{i}", 1000 * (i + 1))
    assert len(labels.labelled()) == 3
    assert len(set(counted) - {"other"}) <= 2 * 3
    assert sum(counted.values()) == sum(sent.values())
