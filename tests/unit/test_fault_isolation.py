"""A request that makes the batched forward fail fails alone: the other rows of its step
are found by running the rows again in halves, and finish with their solo outputs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from openllm_clone.runners.base import StepRow

from openllm_clone.errors import OpenLLMCloneError
from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings

POISON = 4321  # a token id only the faulting request's prompt holds


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Any:
    settings = Settings(model=str(tiny_model_dir), dtype="float32", device="cpu", kv_cache_mb=32)
    instance = LLM.from_settings(settings)
    yield instance
    instance.shutdown()


def _poisoned(rows: list[StepRow]) -> None:
    """The test hook: a prompt chunk holding POISON raises inside the forward."""
    if any(len(r.token_ids) > 1 and POISON in r.token_ids for r in rows):
        raise RuntimeError("simulated kernel fault")


async def test_the_faulting_request_fails_alone(llm: LLM) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [llm.tokenize(f"Request number {i} asks about topic {i * 7}.") for i in range(15)]
    assert all(POISON not in p for p in prompts)
    solo = [(await llm.complete(p, params)).token_ids[0] for p in prompts]
    bad = [*prompts[0][:3], POISON, *prompts[0][3:]]
    llm.engine.fault_hook = _poisoned
    try:
        before = llm.engine.faults_isolated
        results = await asyncio.gather(
            *(llm.complete(p, params) for p in [*prompts[:7], bad, *prompts[7:]]),
            return_exceptions=True,
        )
    finally:
        llm.engine.fault_hook = None
    failure = results.pop(7)
    assert isinstance(failure, OpenLLMCloneError) and "simulated kernel fault" in str(failure)
    assert [r.token_ids[0] for r in results] == solo  # type: ignore[union-attr]
    assert llm.engine.faults_isolated == before + 1
    assert llm.engine.stats()["kv_blocks_used"] == 0 and llm.engine.num_pending == 0
    # The engine goes on serving.
    assert (await llm.complete(prompts[0], params)).token_ids[0] == solo[0]
