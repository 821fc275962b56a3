"""Families beyond the server matrix of tests/e2e/test_families.py, in-process: the engine's
fp32 greedy tokens on the generic runner equal transformers' ``generate``, alone and
batched (Cohere, StableLM, OLMoE, gpt-oss with attention sinks and sliding layers,
EXAONE 4, Granite MoE, Falcon's new decoder architecture from transformers 5.25)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from openllm_clone.llm import LLM
from openllm_clone.protocol import SamplingParams
from openllm_clone.settings import Settings
from tests.families import MORE_FAMILIES, make_family_model, reference_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and",
    "Once upon a time, in a land far away",
    "Paris is the capital of",
]


def _falcon_uses_the_interface() -> bool:
    import inspect

    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon)


@pytest.mark.parametrize("family", sorted(MORE_FAMILIES))
async def test_more_families_match_generate(family: str, tokenizer: Any, tmp_path: Path) -> None:
    if family == "falcon" and not _falcon_uses_the_interface():
        pytest.skip("Falcon calls SDPA itself before transformers 5.25 (refused at start)")
    folder = make_family_model(family, tmp_path / family, tokenizer)
    llm = LLM.from_settings(Settings(model=str(folder), dtype="float32", kv_cache_mb=16))
    try:
        assert llm.runner.tier == "generic"
        ids = [llm.tokenize(p) for p in PROMPTS]
        want = reference_greedy(folder, ids, 16)
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        alone = [(await llm.complete(x, params)).token_ids[0] for x in ids]
        batched = [
            c.token_ids[0] for c in await asyncio.gather(*(llm.complete(x, params) for x in ids))
        ]
        assert alone == want and batched == want
    finally:
        llm.shutdown()


@pytest.mark.parametrize("runner", ["fast", "generic"])
def test_parameter_count_survives_weight_prepacking(runner: str, tiny_model_dir: Path) -> None:
    """bf16 prepacking releases the original Linear weights; the reported size must not shrink."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    llm = LLM.from_settings(
        Settings(model=str(tiny_model_dir), dtype="bfloat16", kv_cache_mb=16, runner=runner)
    )  # type: ignore[arg-type]
    try:
        packed = llm.runner.packed if runner == "fast" else llm.runner.packed_linears > 0
        if not packed:
            pytest.skip("no oneDNN bf16 prepacking on this CPU")
        assert llm.runner.info.num_parameters == sum(p.numel() for p in hf.parameters())
        assert llm.runner.info.vocab_size == hf.config.vocab_size
    finally:
        llm.shutdown()
