"""Fuzz every route from the service's own OpenAPI schema: no 5xx, ever."""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.helpers import Server  # noqa: E402

pytestmark = pytest.mark.e2e

# CI runs a bounded number of examples per operation; raise it for a longer run.
EXAMPLES = int(os.environ.get("OPENLLM_CLONE_FUZZ_EXAMPLES", "25"))


def _bounded(case: object) -> None:
    """Keep generation lengths small so the run stays bounded in time (a request without
    a limit would generate up to the context length: a thousand steps on a loaded CI)."""
    body = getattr(case, "body", None)
    path = str(getattr(case, "path", ""))
    if isinstance(body, dict):
        keys = ("max_new_tokens", "max_tokens", "max_completion_tokens", "max_output_tokens")
        for key in keys:
            if isinstance(body.get(key), int) and body[key] > 16:
                body[key] = 16
        if not any(key in body for key in keys):
            if path.endswith("completions"):
                body["max_tokens"] = 16
            elif path.endswith("responses"):
                body["max_output_tokens"] = 16
            elif path.startswith("/generate") and not isinstance(body.get("llm_config"), dict):
                body["max_new_tokens"] = 16
        if isinstance(body.get("llm_config"), dict):
            body["llm_config"].pop("max_new_tokens", None)


def test_no_server_errors_on_any_route(tiny_server: Server) -> None:
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{tiny_server.url}/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen = 0
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: object) -> None:
            nonlocal seen
            _bounded(case)
            response = case.call(timeout=60)  # type: ignore[attr-defined]
            seen += 1
            assert response.status_code < 500, (
                getattr(case, "method", "?"),
                getattr(case, "path", "?"),
                response.status_code,
                response.text[:300],
            )

        run()
    assert seen >= len(operations)
    print(f"\nfuzzed {len(operations)} operations with {seen} requests, no 5xx")


def test_server_still_serves_after_fuzzing(tiny_server: Server) -> None:
    r = httpx.post(
        f"{tiny_server.url}/v1/generate", json={"prompt": "hi", "max_new_tokens": 3}, timeout=60
    )
    assert r.status_code == 200 and len(r.json()["outputs"][0]["token_ids"]) == 3
