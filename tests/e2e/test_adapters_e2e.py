"""Adapters on a real server: concurrent mixed streams, hot-load under load, eviction, 4xx."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from openllm_clone.client import APIStatusError, AsyncHTTPClient, HTTPClient
from tests.helpers import Server

pytestmark = pytest.mark.e2e

PROMPT = "Write a sentence about the ocean."


async def _tokens(client: AsyncHTTPClient, adapter: str | None, stamps: list[float]) -> list[int]:
    out: list[int] = []
    async for event in client.generate_stream(
        PROMPT, adapter_name=adapter, max_new_tokens=40, ignore_eos=True
    ):
        stamps.append(time.perf_counter())
        for o in event.outputs:
            out.extend(o.token_ids)
    return out


async def test_eight_streams_over_four_adapters_and_base_while_loading(
    tiny_server: Server, tiny_adapters: dict[str, Path]
) -> None:
    async with AsyncHTTPClient(tiny_server.url) as client:
        await client.load_adapter("delta", str(tiny_adapters["delta"]))
        # max-adapters is 3: alpha, beta, delta are loaded; gamma comes in on demand below.
        names: list[str | None] = [None, "alpha", "beta", "delta", None, "alpha", "beta", "delta"]
        alone = {}
        for name in set(names):
            alone[name] = await _tokens(client, name, [])
        stamps: list[float] = []
        streams = [asyncio.create_task(_tokens(client, n, stamps)) for n in names]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        info = await client.load_adapter("gamma", str(tiny_adapters["gamma"]))
        loaded = time.perf_counter()
        results = await asyncio.gather(*streams)
        assert info["state"] == "ready"
        for name, got in zip(names, results):
            assert got == alone[name], name
        # Loading did not stall the running streams noticeably: no gap between two
        # consecutive stream events during the load is longer than 1 s on this tiny model.
        ordered = sorted(stamps)
        gaps = [b - a for a, b in zip(ordered, ordered[1:]) if a >= started and b <= loaded + 0.5]
        assert max(gaps, default=0.0) < 1.0
        # gamma took a slot: the least recently used unpinned adapter was evicted (3 slots).
        states = {a["name"]: a["state"] for a in await client.list_adapters()}
        assert states["gamma"] == "ready"
        assert sum(1 for s in states.values() if s == "ready") == 3
        evicted = [n for n, s in states.items() if s == "registered"]
        assert len(evicted) == 1
        # An evicted adapter is loaded again on demand and still gives its own output.
        again = await _tokens(client, evicted[0], [])
        assert again == alone[evicted[0]]


def test_openai_sdk_model_is_the_adapter(tiny_server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    outs = {}
    for model in ("tiny-llama", "alpha", "beta"):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        outs[model] = r.choices[0].text
    assert len(set(outs.values())) == 3
    with HTTPClient(tiny_server.url) as ours:
        same = ours.generate(PROMPT, adapter_name="alpha", max_new_tokens=12)
    assert same.outputs[0].text == outs["alpha"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "x", "source": "/definitely/not/here"}, 404),
        ({"name": "bad name!", "source": "/tmp"}, 400),
        ({"name": "x"}, 400),
        ({"name": "x", "source": "/tmp"}, 422),  # a folder without adapter_config.json
    ],
)
def test_adapter_load_failures_are_json_and_change_nothing(
    tiny_server: Server, body: dict[str, str], status: int
) -> None:
    before = httpx.get(f"{tiny_server.url}/v1/adapters", timeout=30).json()["data"]
    r = httpx.post(f"{tiny_server.url}/v1/adapters", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    after = httpx.get(f"{tiny_server.url}/v1/adapters", timeout=30).json()["data"]
    assert [a["name"] for a in after] == [a["name"] for a in before]
    ok = httpx.post(
        f"{tiny_server.url}/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


def test_incompatible_adapter_is_422(
    tiny_server: Server, tmp_path: Path, tokenizer: object
) -> None:
    from tests.helpers import make_adapter, make_tiny_model

    other = make_tiny_model(tmp_path / "wide", tokenizer, hidden=128)
    wrong = make_adapter(other, tmp_path / "wide-adapter", seed=3)
    with HTTPClient(tiny_server.url) as client, pytest.raises(APIStatusError) as info:
        client.load_adapter("wide", str(wrong), force=True)
    assert info.value.status_code == 422
    with HTTPClient(tiny_server.url) as client, pytest.raises(APIStatusError) as info2:
        client.load_adapter("wide", str(wrong))  # trained on another base: refused without force
    assert info2.value.status_code == 422 and "force" in str(info2.value)


def test_merged_adapters_per_request(tiny_server: Server) -> None:
    merged = {"ids": ["alpha", "beta"], "weights": [0.5, 0.5]}
    r = httpx.post(
        f"{tiny_server.url}/v1/generate",
        timeout=60,
        json={"prompt": PROMPT, "max_new_tokens": 8, "merged_adapters": merged},
    )
    assert r.status_code == 200, r.text
    assert r.json()["adapter_name"] == "merge:alpha*0.5+beta*0.5"
    bad = httpx.post(
        f"{tiny_server.url}/v1/generate",
        timeout=60,
        json={"prompt": PROMPT, "merged_adapters": {"ids": ["alpha"], "weights": [1]}},
    )
    assert bad.status_code == 400
    both = httpx.post(
        f"{tiny_server.url}/v1/generate",
        timeout=60,
        json={"prompt": PROMPT, "adapter_name": "alpha", "merged_adapters": merged},
    )
    assert both.status_code == 400
