"""The client's retry rules, isolated from any server with httpx's MockTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from openllm_clone import client as client_mod
from openllm_clone.client import APIConnectionError, APIStatusError, AsyncHTTPClient, HTTPClient

BACKOFF = client_mod._backoff  # the real one, before the fixture below replaces it
UNAVAILABLE = {
    "error": {"message": "replica died", "type": "unavailable", "param": None, "code": 503}
}
OK = {
    "request_id": "r",
    "prompt": "p",
    "adapter_name": None,
    "finished": True,
    "outputs": [{"index": 0, "text": "hi", "token_ids": [1], "finish_reason": "length"}],
    "prompt_token_ids": [1],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "_backoff", lambda attempt, retry_after=None: 0.0)


def _sync(handler: Callable[[httpx.Request], httpx.Response], **kw: int) -> HTTPClient:
    c = HTTPClient("http://test", **kw)
    c._http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    return c


def _scripted(
    responses: list[httpx.Response | Exception],
) -> tuple[Callable[[httpx.Request], httpx.Response], list[int]]:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        item = responses[min(len(calls), len(responses) - 1)]
        calls.append(1)
        if isinstance(item, Exception):
            raise item
        return item

    return handler, calls


def _sse(*events: dict[str, object], done: bool = True) -> httpx.Response:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + (
        "data: [DONE]\n\n" if done else ""
    )
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def test_503_is_retried_until_it_succeeds() -> None:
    handler, calls = _scripted(
        [
            httpx.Response(503, json=UNAVAILABLE),
            httpx.Response(503, json=UNAVAILABLE),
            httpx.Response(200, json=OK),
        ]
    )
    with _sync(handler) as c:
        assert c.generate("p").outputs[0].text == "hi"
    assert len(calls) == 3


def test_retries_are_bounded_and_the_last_error_is_raised() -> None:
    handler, calls = _scripted([httpx.Response(503, json=UNAVAILABLE)])
    with _sync(handler, max_retries=1) as c, pytest.raises(APIStatusError) as info:
        c.generate("p")
    assert info.value.status_code == 503 and len(calls) == 2


@pytest.mark.parametrize("status", [400, 404, 422, 500, 504])
def test_client_errors_and_server_faults_are_not_retried(status: int) -> None:
    handler, calls = _scripted([httpx.Response(status, json={"error": {"message": "x"}})])
    with _sync(handler) as c, pytest.raises(APIStatusError) as info:
        c.generate("p")
    assert info.value.status_code == status and len(calls) == 1


def test_connection_refused_is_retried_but_other_transport_errors_are_not() -> None:
    handler, calls = _scripted([httpx.ConnectError("refused"), httpx.Response(200, json=OK)])
    with _sync(handler) as c:
        assert c.generate("p").outputs[0].text == "hi"
    assert len(calls) == 2
    handler, calls = _scripted([httpx.RemoteProtocolError("dropped"), httpx.Response(200, json=OK)])
    with _sync(handler) as c, pytest.raises(APIConnectionError):
        c.generate("p")
    assert len(calls) == 1  # the server may have run it: not sent again


def test_stream_retried_when_it_fails_before_its_first_event() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    handler, calls = _scripted([_sse(UNAVAILABLE, done=False), _sse(chunk)])
    with _sync(handler) as c:
        assert list(c.chat_stream([{"role": "user", "content": "x"}])) == [chunk]
    assert len(calls) == 2


def test_stream_not_retried_after_events_went_out() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    handler, calls = _scripted([_sse(chunk, UNAVAILABLE, done=False), _sse(chunk)])
    got = []
    with _sync(handler) as c, pytest.raises(APIStatusError) as info:
        for event in c.chat_stream([{"role": "user", "content": "x"}]):
            got.append(event)
    assert got == [chunk] and info.value.status_code == 503 and len(calls) == 1


def test_async_client_retries_the_same_way() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}

    async def main() -> tuple[str, list[dict[str, object]]]:
        handler, _ = _scripted(
            [httpx.Response(503, json=UNAVAILABLE), httpx.Response(200, json=OK)]
        )
        async with AsyncHTTPClient("http://test") as c:
            c._http = httpx.AsyncClient(
                base_url="http://test", transport=httpx.MockTransport(handler)
            )
            text = (await c.generate("p")).outputs[0].text
        handler, _ = _scripted(
            [httpx.Response(503, json=UNAVAILABLE), _sse(UNAVAILABLE, done=False), _sse(chunk)]
        )
        async with AsyncHTTPClient("http://test") as c:
            c._http = httpx.AsyncClient(
                base_url="http://test", transport=httpx.MockTransport(handler)
            )
            events = [e async for e in c.chat_stream([{"role": "user", "content": "x"}])]
        return text, events

    assert asyncio.run(main()) == ("hi", [chunk])


def test_backoff_honours_retry_after_with_a_cap() -> None:
    assert BACKOFF(0, "2") == 2.0
    assert BACKOFF(0, "3600") == 30.0
    assert BACKOFF(1, "soon") <= 1.0  # unparsable: back-off instead
    assert 0.25 <= BACKOFF(0) <= 0.5 and BACKOFF(10) <= 8.0
