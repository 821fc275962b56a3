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
import openllm_clone.integrations.ray_replica as ray_replica
from openllm_clone.errors import AdapterNotFoundError
from openllm_clone.protocol import RequestOutput, SeqDelta, TokenLogprob

assert ray_router.LLMReplica is ray_replica.LLMReplica
body = ray_replica._error_message(AdapterNotFoundError("no adapter x"))
assert "no adapter x" in str(body), body
assert api.error_response(AdapterNotFoundError("x")).status_code == 404
RequestOutput("r", [SeqDelta(0, "a", [1], None, [TokenLogprob(1, -0.5)])], 1, 1, True)
print(sorted(m for m in ("torch", "transformers", "bentoml") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_start_checks_a_fast_model_and_loads_the_service_without_torch(
    tiny_model_dir: object,
) -> None:
    """``openllm-clone start`` reads the model's config and imports the BentoML service
    before any worker starts: for a model the fast runner serves, neither needs torch or
    transformers (the worker imports them; the CLI importing them too cost ~5 s a start)."""
    code = f"""
import sys
from pathlib import Path
import openllm_clone.service
from openllm_clone.runners.support import check_model
from openllm_clone.settings import Settings

support = check_model(Path({str(tiny_model_dir)!r}), Settings(model="x", dtype="float32"))
assert support.runner == "fast", support
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
generic = check_model(Path({str(tiny_model_dir)!r}), Settings(model="x", runner="generic"))
print(generic.runner, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The generic check (asked for explicitly) does need transformers.
    assert out.stdout.splitlines() == ["[]", "generic True"], out.stdout


def test_the_engine_runs_without_bentoml(tiny_model_dir: object) -> None:
    """The engine and the runners never import BentoML (ARCHITECTURE.md): an LLM loads,
    answers and unloads in a process where ``import bentoml`` fails (a Ray worker or a
    GPU machine with only torch, transformers, peft and pydantic)."""
    code = f"""
import asyncio, sys
sys.modules["bentoml"] = None  # import bentoml raises ImportError from here on
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings

llm = LLM.from_settings(Settings(model={str(tiny_model_dir)!r}, dtype="float32", kv_cache_mb=16))
out = asyncio.run(llm.complete(llm.tokenize("Hello"), SamplingParams(max_new_tokens=4)))
llm.shutdown()
print(len(out.token_ids[0]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "4", out.stdout
