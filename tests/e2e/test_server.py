"""A real `openllm-clone start` server on 127.0.0.1 with the real client, openai SDK and SSE."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from openllm_clone.client import APIConnectionError, APIStatusError, AsyncHTTPClient, HTTPClient
from tests.helpers import Server

pytestmark = pytest.mark.e2e


def test_client_generate_and_stream_agree(tiny_server: Server) -> None:
    with HTTPClient(tiny_server.url) as client:
        assert client.health()
        meta = client.metadata()
        assert meta["architecture"] == "LlamaForCausalLM" and meta["dtype"] == "float32"
        assert sorted(meta["adapters"]) == ["alpha", "beta"]
        full = client.generate("Hello there", max_new_tokens=12)
        assert full.finished and full.outputs[0].finish_reason in ("length", "stop")
        assert full.usage and full.usage["completion_tokens"] == len(full.outputs[0].token_ids)
        events = list(client.generate_stream("Hello there", max_new_tokens=12))
        assert events[-1].finished
        streamed = "".join(o.text for e in events for o in e.outputs)
        assert streamed == full.outputs[0].text
        tokens = [t for e in events for o in e.outputs for t in o.token_ids]
        assert tokens == full.outputs[0].token_ids


async def test_async_client_and_adapters(tiny_server: Server) -> None:
    async with AsyncHTTPClient(tiny_server.url) as client:
        base, alpha = await asyncio.gather(
            client.generate("Tell me a story", max_new_tokens=10),
            client.generate("Tell me a story", max_new_tokens=10, adapter_name="alpha"),
        )
        assert base.outputs[0].token_ids != alpha.outputs[0].token_ids
        chunks = [
            c
            async for c in client.generate_stream(
                "Tell me a story", max_new_tokens=10, adapter_name="alpha"
            )
        ]
        assert [t for c in chunks for o in c.outputs for t in o.token_ids] == alpha.outputs[
            0
        ].token_ids
        chat = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=5)
        assert chat["choices"][0]["message"]["role"] == "assistant"


def test_openai_sdk_completions_and_chat(tiny_server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    assert models[0] == "tiny-llama" and {"alpha", "beta"} <= set(models)
    done = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model="tiny-llama", prompt="Once", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == done.choices[0].text
    chat = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    pieces = client.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(pieces)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-adapter", messages=[{"role": "user", "content": "x"}]
        )


def test_raw_sse_is_well_formed(tiny_server: Server) -> None:
    body = {"prompt": "Hi", "max_new_tokens": 5}
    with httpx.stream("POST", f"{tiny_server.url}/v1/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["finished"] is True
    assert sum(len(p["outputs"][0]["token_ids"]) for p in payloads) == 5


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ("/v1/generate", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/generate", {"prompt": "x", "top_p": 2}, "top_p"),
        ("/v1/generate", {"prompt": ""}, "prompt"),
        ("/v1/generate", {"prompt": "x", "unknown": 1}, "unknown"),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 100000}, "max_new_tokens"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "n": 99}, "n"),
        ("/v1/chat/completions", {"model": "tiny-llama", "messages": []}, "messages"),
    ],
)
def test_bad_requests_get_400_json_and_server_keeps_serving(
    tiny_server: Server, path: str, body: dict[str, object], param: str
) -> None:
    r = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "")
    ok = httpx.post(
        f"{tiny_server.url}/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


def test_malformed_json_is_400(tiny_server: Server) -> None:
    r = httpx.post(
        f"{tiny_server.url}/v1/generate",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_client_errors_are_typed(tiny_server: Server) -> None:
    with HTTPClient(tiny_server.url) as client, pytest.raises(APIStatusError) as info:
        client.generate("x", adapter_name="missing")
    assert info.value.status_code == 404
    with HTTPClient("http://127.0.0.1:9", timeout=2) as dead, pytest.raises(APIConnectionError):
        dead.metadata()


def test_runtime_adapter_load_list_unload(
    tiny_server: Server, tiny_adapters: dict[str, Path]
) -> None:
    with HTTPClient(tiny_server.url) as client:
        info = client.load_adapter("gamma", str(tiny_adapters["gamma"]))
        assert info["state"] == "ready" and info["rank"] == 16
        assert info["target_modules"] == ["q_proj", "v_proj"]
        names = {a["name"]: a for a in client.list_adapters()}
        assert {"alpha", "beta", "gamma"} <= set(names)
        out = client.generate("Hi", adapter_name="gamma", max_new_tokens=4)
        assert len(out.outputs[0].token_ids) == 4
        client.unload_adapter("gamma")
        assert "gamma" not in {a["name"] for a in client.list_adapters()}
        with pytest.raises(APIStatusError) as info404:
            client.generate("Hi", adapter_name="gamma", max_new_tokens=2)
        assert info404.value.status_code == 404
        with pytest.raises(APIStatusError) as info422:
            client.load_adapter("bogus", str(tiny_adapters["gamma"].parent / "nope"))
        assert info422.value.status_code in (404, 422)


def test_metrics_after_traffic(tiny_server: Server) -> None:
    with HTTPClient(tiny_server.url) as client:
        for _ in range(2):
            client.generate("count", max_new_tokens=3)
    text = httpx.get(f"{tiny_server.url}/metrics", timeout=30).text
    for name in (
        "openllm_clone_requests_total",
        "openllm_clone_time_to_first_token_seconds",
        "openllm_clone_time_per_output_token_seconds",
        "openllm_clone_generated_tokens_total",
        "openllm_clone_queue_size",
        "openllm_clone_batch_size",
        "openllm_clone_request_duration_seconds",
    ):
        assert name in text, name
    ok_lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("openllm_clone_requests_total{") and 'status="ok"' in ln
    ]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in ok_lines) >= 2
