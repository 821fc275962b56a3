"""Auth on every route, body limits, queue limits, path rules: a server with keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openllm_clone.client import APIStatusError, HTTPClient
from openllm_clone.testing import Server, run_server

pytestmark = pytest.mark.e2e

KEY, OTHER, ADMIN = "sk-test-key", "sk-second-key", "sk-admin-key"


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> Iterator[Server]:
    root = tiny_adapters["alpha"].parent
    log = tmp_path_factory.mktemp("logs") / "secured.log"
    args = [
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--api-key",
        f"{KEY},{OTHER}",
        "--admin-api-key",
        ADMIN,
        "--adapter-root",
        str(root),
        "--max-body-bytes",
        "20000",
        "--max-queue",
        "2",
        "--max-batch-size",
        "2",
        "--kv-cache-mb",
        "32",
    ]
    with run_server(args, {}, log) as server:
        yield server


def _h(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/metadata",
        "/v1/models",
        "/metrics",
        "/v1/adapters",
        "/v1/openapi.json",
        "/schema.json",
        "/",
    ],
)
def test_every_route_needs_a_key(secured: Server, path: str) -> None:
    for bad in (None, "wrong", KEY + "x"):
        r = httpx.get(f"{secured.url}{path}", headers=_h(bad), timeout=30)
        assert r.status_code == 401, (path, bad)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{secured.url}{path}", headers=_h(KEY), timeout=30).status_code == 200
    assert httpx.get(f"{secured.url}{path}", headers=_h(OTHER), timeout=30).status_code == 200


def test_probes_stay_open(secured: Server) -> None:
    for path in ("/livez", "/readyz"):
        assert httpx.get(f"{secured.url}{path}", timeout=30).status_code == 200


def test_clients_pass_the_key(secured: Server) -> None:
    import openai

    with HTTPClient(secured.url, api_key=KEY) as client:
        assert client.generate("hi", max_new_tokens=2).outputs[0].token_ids
    with HTTPClient(secured.url, api_key="nope") as client, pytest.raises(APIStatusError) as info:
        client.metadata()
    assert info.value.status_code == 401
    sdk = openai.OpenAI(base_url=f"{secured.url}/v1", api_key=KEY)
    assert sdk.completions.create(model="tiny-llama", prompt="x", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secured.url}/v1", api_key="bad").models.list()


def test_adapter_management_needs_the_admin_key(
    secured: Server, tiny_adapters: dict[str, Path]
) -> None:
    body = {"name": "alpha", "source": str(tiny_adapters["alpha"])}
    r = httpx.post(f"{secured.url}/v1/adapters", json=body, headers=_h(KEY), timeout=30)
    assert r.status_code == 403  # a valid key without the permission
    assert r.json()["error"]["type"] == "permission_denied"
    r = httpx.post(f"{secured.url}/v1/adapters", json=body, headers=_h(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    assert (
        httpx.delete(f"{secured.url}/v1/adapters/alpha", headers=_h(KEY), timeout=30).status_code
        == 403
    )
    assert (
        httpx.delete(f"{secured.url}/v1/adapters/alpha", headers=_h(ADMIN), timeout=30).status_code
        == 200
    )


def test_body_limit_is_413(secured: Server) -> None:
    big = {"prompt": "x" * 30000}
    r = httpx.post(f"{secured.url}/v1/generate", json=big, headers=_h(KEY), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    ok = httpx.post(
        f"{secured.url}/v1/generate",
        json={"prompt": "x", "max_new_tokens": 2},
        headers=_h(KEY),
        timeout=30,
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("source", ["{root}/../escape", "/etc", "{root}/link-out"])
def test_adapter_paths_stay_under_the_roots(
    secured: Server, tiny_adapters: dict[str, Path], tiny_model_dir: Path, source: str
) -> None:
    root = tiny_adapters["alpha"].parent
    outside = tiny_model_dir.parent / "outside-adapter"
    if not outside.exists():
        import shutil

        shutil.copytree(tiny_adapters["beta"], outside)
    link = root / "link-out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    escape = root.parent / "escape"
    if not escape.exists():
        import shutil

        shutil.copytree(tiny_adapters["beta"], escape)
    r = httpx.post(
        f"{secured.url}/v1/adapters",
        headers=_h(ADMIN),
        timeout=30,
        json={"name": "sneaky", "source": source.format(root=root)},
    )
    assert r.status_code == 422, r.text
    assert "outside the allowed adapter roots" in r.json()["error"]["message"]


def test_queue_full_is_503_with_retry_after(secured: Server) -> None:
    import asyncio

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers=_h(KEY)) as client:
            body = {"prompt": "count slowly", "max_new_tokens": 300, "ignore_eos": True}
            return await asyncio.gather(
                *(client.post(f"{secured.url}/v1/generate", json=body) for _ in range(8))
            )

    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["type"] == "overloaded" and int(busy.headers["retry-after"]) >= 1
