"""What must import without torch: the routes and error formatting (the Ray router, an
ingress that may hold no model, formats errors with them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray")


def test_api_and_the_ray_router_import_no_torch() -> None:
    code = """
import sys
import openllm_clone.api as api
import openllm_clone.integrations.ray_serve as ray_router
from openllm_clone.errors import AdapterNotFoundError
from openllm_clone.protocol import RequestOutput, SeqDelta, TokenLogprob

body = ray_router._error_message(AdapterNotFoundError("no adapter x"))
assert "no adapter x" in str(body), body
assert api.error_response(AdapterNotFoundError("x")).status_code == 404
RequestOutput("r", [SeqDelta(0, "a", [1], None, [TokenLogprob(1, -0.5)])], 1, 1, True)
print(sorted(m for m in ("torch", "transformers", "bentoml") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
